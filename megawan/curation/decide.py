"""One clip's measures and verdict: read it once, measure everything, turn thresholds into reasons.

    record = measure_clip(entry, cfg, scorers)   # the report line of one manifest entry, before duplicates
    # {"id", "path", "caption", "keep", "reasons", "scenes", "crop", "motion", "duplicate_of", "measures", "probe",
    #  ...}

`reasons` uses the vocabulary of megawan.config.curate.REASONS (docs/curation.md); `letterbox` keeps the clip
(with its crop), every other reason rejects it. The duplicates pass (runner) adds `duplicate` afterwards. A file
that cannot be measured gets one reason (undecodable, no_video, zero_length) and its message under `error`.
"""

from __future__ import annotations

import numpy as np

from megawan.config.curate import KEPT_REASONS
from megawan.curation.duplicates import clip_hashes
from megawan.curation.frames import ClipError, read_clip
from megawan.curation.motion import motion_class, motion_measures
from megawan.curation.quality import border_crop, border_share, picture_measures
from megawan.curation.scenes import SceneSplitter
from megawan.curation.scorers import score_reasons


def keep_of(reasons: list) -> bool:
    return all(r in KEPT_REASONS for r in reasons)


def _base(entry) -> dict:
    return {"id": entry.id, "path": entry.path, "caption": entry.caption, "keep": False, "reasons": [],
            "scenes": [], "crop": None, "motion": None, "duplicate_of": None, "measures": {}, "probe": None}


def failed(entry, reason: str, message: str) -> dict:
    return {**_base(entry), "reasons": [reason], "error": message}


def _small_crop(crop: list, clip) -> list:
    """The crop in the analysis frames' pixels."""
    sx, sy = clip.small_size[0] / clip.width, clip.small_size[1] / clip.height
    x, y = int(np.ceil(crop[0] * sx)), int(np.ceil(crop[1] * sy))
    return [x, y, max(2, int(crop[2] * sx)), max(2, int(crop[3] * sy))]


def measure_clip(entry, cfg, scorers=()) -> dict:
    a, t = cfg.analysis, cfg.thresholds
    shots = SceneSplitter(t.scene_threshold, a.min_scene_frames)
    try:
        clip = read_clip(entry.path, a.side, a.key_frames, entry.start, entry.end, a.flow_pairs, shots.add)
    except ClipError as e:
        return failed(entry, e.reason, str(e))
    crop = border_crop(clip.keys, a.border_luma)
    share = border_share(crop, clip.width, clip.height)
    letterbox = share >= t.letterbox_min and crop[2] * crop[3] >= 0.25 * clip.width * clip.height
    if not letterbox:
        crop = [0, 0, clip.width, clip.height]
    moves = motion_measures(clip.pairs, _small_crop(crop, clip))
    kind = motion_class(moves, t.static_max, t.shaky_min)
    scenes = shots.scenes(clip.end)
    measures = {"duration": round(clip.end - clip.start, 4), "frames": int(len(clip.times)), "fps": round(clip.fps, 4),
                "width": clip.width, "height": clip.height, "border": round(share, 4), **moves, "motion_class": kind,
                **picture_measures(clip.keys, crop, a.side)}
    reasons = []
    if not any(end - start >= t.min_duration_s - 1e-6 for start, end in scenes):
        reasons.append("too_short")
    if kind in ("static", "shaky"):
        reasons.append(kind)
    exposure = [name for name in ("overexposed", "underexposed") if measures[name] > getattr(t, name + "_max")]
    reasons += exposure
    if measures["blur"] < t.blur_min and not exposure:  # a picture clipped black or white has no edges to judge
        reasons.append("blurry")
    if letterbox:
        reasons.append("letterbox")
    if scorers:
        x, y, w, h = crop
        inside = clip.keys[:, y:y + h, x:x + w]
        for scorer_cfg, scorer in scorers:
            value = float(scorer(inside))
            measures[scorer_cfg.name] = value
            reasons += score_reasons(scorer_cfg, value)
    return {**_base(entry), "keep": keep_of(reasons), "reasons": reasons, "scenes": scenes,
            "crop": crop if letterbox else None, "motion": moves["motion"], "measures": measures, "probe": clip.probe,
            "hashes": clip_hashes(clip.keys, crop)}
