"""Held-out clips for judging a VAE: each manifest row decoded once and cut to EVERY bucket it can fill, so that
each bucket (resolution x length) is scored on the same clips for every VAE compared.

    clips, skipped = eval_clips("held_out.jsonl", ["17x32x32", "1x32x32"], fps=16, limit=8)
    clips[0]   # {"id": "clip3", "bucket": "17x32x32", "video": float [3, 17, 32, 32] in [-1, 1]}

A video goes to each video bucket no longer than it (its first frames) and to each image bucket (its first
frame); an image to each image bucket. Frames are resized to cover the bucket and centre-cropped, as precompute
does (megawan.data.buckets.resize_center_crop). A file that cannot be decoded, or fills no bucket, is returned in
`skipped` ({"id", "path", "reason"}), never raised.
"""

from __future__ import annotations

from typing import Optional

from megawan.data.buckets import parse_buckets, resize_center_crop
from megawan.data.decoding import DecodeError
from megawan.data.manifest import read_manifest
from megawan.data.video import decode_image, decode_video
from megawan.utils.images import even_indices


def _frames(entry, longest: int, fps: float, decode: str):
    if entry.is_image:
        return decode_image(entry.path)
    rate = entry.fps or fps
    start = entry.start or 0.0
    end = start + longest / rate + 1e-6  # never decode more than the longest bucket uses
    if entry.end is not None:
        end = min(end, entry.end)
    return decode_video(entry.path, fps=rate, start=entry.start, end=end, backend=decode)


def eval_clips(manifest: str, buckets: list, fps: float = 16.0, limit: Optional[int] = None,
               decode: str = "auto", temporal_stride: int = 4) -> tuple:
    """(clips, skipped) from the rows of `manifest` (`limit`: that many rows, evenly spread over the manifest;
    None: all). buckets: "FxHxW" names. See the module docstring."""
    parsed = parse_buckets(buckets, temporal_stride=temporal_stride)
    entries = read_manifest(manifest)
    entries = [entries[i] for i in even_indices(len(entries), limit)]
    longest = max((b.frames for b in parsed if not b.is_image), default=1)
    clips, skipped = [], []
    for entry in entries:
        try:
            frames = _frames(entry, longest, fps, decode)
        except DecodeError as e:
            skipped.append({"id": entry.id, "path": entry.path, "reason": e.reason})
            continue
        fits = [b for b in parsed if b.frames <= frames.shape[0] and (b.is_image or not entry.is_image)]
        if not fits:
            skipped.append({"id": entry.id, "path": entry.path,
                            "reason": f"fills no bucket ({frames.shape[0]} frames at {entry.fps or fps:g} fps)"})
        for b in fits:
            clips.append({"id": entry.id, "bucket": b.name,
                          "video": resize_center_crop(frames[:b.frames], b.height, b.width)})
    return clips, skipped
