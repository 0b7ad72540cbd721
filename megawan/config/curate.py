"""The curation config (tools/curate.py; docs/curation.md): what is measured and where each measure's line is.

    cfg = load_curate_config("curate.yaml", ["thresholds.blur_min=40", "analysis.flow_pairs=12"])

Three sections and a list; every key has a default, so an empty file (or none) is a working config. Unknown keys
are refused naming the nearest known one, and a threshold that cannot mean anything (a negative blur floor, a
fraction above 1) is a ConfigError naming the field: `thresholds.blur_min: -1.0 is negative`.

The units, fixed so one config serves clips of any size:
- motion, camera_motion, object_motion, jitter: optical-flow displacement in % of the frame's longer side per
  source frame (Farneback dense flow on the analysis frames);
- overexposed / underexposed: the fraction of pixels (inside the crop) at luma >= 250 / <= 10;
- blur: the variance of the Laplacian of the luma inside the crop, at the analysis size (sharp real footage
  scores hundreds; a defocused or heavily compressed clip tens);
- letterbox: the black share of the frame's height or width, summed over both sides;
- duplicate: the Hamming distance (of 64 bits) of the perceptual hashes of every key frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megawan.config.fields import ConfigError, build, checker
from megawan.config.run import read_raw_config


# The reasons a clip can carry in report.jsonl (docs/curation.md). All but `letterbox` reject the clip; a
# letterboxed clip is kept with its crop. A scorer adds its own name. no_caption: a folder's clip without its
# caption (.txt).
REASONS = ("undecodable", "no_video", "zero_length", "no_caption", "too_short", "static", "shaky", "overexposed",
           "underexposed", "blurry", "letterbox", "duplicate")
KEPT_REASONS = ("letterbox",)


@dataclass
class ThresholdsConfig:
    min_duration_s: float = 1.0  # too_short: a clip, or a scene of it (shorter scenes leave the manifest), below
    static_max: float = 0.1  # static: mean motion below this (% of the longer side per frame)
    shaky_min: float = 0.6  # shaky: the camera's translation varies (jitter) by at least this between frame pairs
    overexposed_max: float = 0.4  # overexposed: a larger share of the pixels is clipped white
    underexposed_max: float = 0.6  # underexposed: a larger share of the pixels is black
    blur_min: float = 100.0  # blurry: Laplacian variance below this (the usual line for 8-bit frames)
    letterbox_min: float = 0.04  # letterbox: black bars covering at least this share of the height or width
    duplicate_max_distance: int = 6  # duplicate: every key frame's hash within this Hamming distance (0 - 7)
    scene_threshold: float = 27.0  # a cut: PySceneDetect ContentDetector's HSV difference score above this

    def validate(self, prefix: str = "thresholds") -> "ThresholdsConfig":
        need = checker(prefix)
        for name in ("min_duration_s", "static_max", "shaky_min", "blur_min", "scene_threshold"):
            value = getattr(self, name)
            need(value >= 0, name, f"{value} is negative")
        for name in ("overexposed_max", "underexposed_max"):
            value = getattr(self, name)
            need(0 < value <= 1, name, f"{value} is not a fraction in (0, 1]")
        need(0 < self.letterbox_min < 1, "letterbox_min", f"{self.letterbox_min} is not a fraction in (0, 1)")
        # 8 bands of 8 bits: two hashes within 7 bits share a band, so the banded search misses no pair
        need(0 <= self.duplicate_max_distance <= 7, "duplicate_max_distance",
             f"{self.duplicate_max_distance} is not in 0 - 7 (bits of a 64-bit hash the search is sure to find)")
        need(self.scene_threshold <= 255, "scene_threshold", f"{self.scene_threshold} is above 255 (the score's range)")
        return self


@dataclass
class AnalysisConfig:
    side: int = 256  # analysis frames: the longer side shrunk to this (never enlarged)
    flow_pairs: int = 8  # consecutive frame pairs, spread over the clip, that optical flow is computed on
    key_frames: int = 3  # frames hashed for duplicates (and measured for exposure, blur, borders), evenly spread
    border_luma: int = 24  # a row / column of mean luma at most this is black (letterbox)
    min_scene_frames: int = 8  # PySceneDetect's min_scene_len: no two cuts closer than this

    def validate(self, prefix: str = "analysis") -> "AnalysisConfig":
        need = checker(prefix)
        need(self.side >= 16, "side", f"{self.side} is below 16 pixels")
        need(self.flow_pairs >= 2, "flow_pairs", f"{self.flow_pairs}: shake needs at least 2 frame pairs")
        need(self.key_frames >= 1, "key_frames", f"{self.key_frames} is below 1")
        need(0 <= self.border_luma < 255, "border_luma", f"{self.border_luma} is not a luma in 0 - 254")
        need(self.min_scene_frames >= 1, "min_scene_frames", f"{self.min_scene_frames} is below 1")
        return self


@dataclass
class ReportConfig:
    thumbnails: int = 6  # clips shown per reason (and of the kept ones) in report.html
    html: bool = True  # write report.html and its histograms (matplotlib)

    def validate(self, prefix: str = "report") -> "ReportConfig":
        checker(prefix)(self.thumbnails >= 0, "thumbnails", f"{self.thumbnails} is negative")
        return self


@dataclass
class ScorerConfig:
    """A model-based (or any) scorer: `target` a dotted path to a class (module.Class or module:Class) built with
    `options`, called on the key frames; above `max` (or below `min`) the clip is rejected with reason `name`."""

    name: str = ""
    target: str = ""
    options: dict = field(default_factory=dict)
    min: Optional[float] = None
    max: Optional[float] = None

    def validate(self, prefix: str) -> "ScorerConfig":
        need = checker(prefix)
        need(self.name.isidentifier(), "name", f"{self.name!r} is not a name (letters, digits, _)")
        need("." in self.target or ":" in self.target, "target", f"{self.target!r} is not a dotted path "
             "(package.module.Class)")
        need(isinstance(self.options, dict), "options", "expected a mapping")
        return self


@dataclass
class CurateConfig:
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    scorers: tuple = ()  # of ScorerConfig

    def validate(self) -> "CurateConfig":
        self.thresholds.validate()
        self.analysis.validate()
        self.report.validate()
        names = [s.name for s in self.scorers]
        for i, name in enumerate(names):
            if name in REASONS or name in names[:i]:
                owner = "a built-in reason" if name in REASONS else "another scorer"
                raise ConfigError(f"scorers[{i}].name: {name!r} is taken (by {owner}); a scorer's reason is its own")
        return self


def _scorers(raw) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"scorers: expected a list of {{name, target, options, min, max}}, got {raw!r}")
    return tuple(build(ScorerConfig, item, f"scorers[{i}]").validate(f"scorers[{i}]") for i, item in enumerate(raw))


def load_curate_config(path: Optional[str] = None, overrides: tuple = ()) -> CurateConfig:
    """The config of `path` (YAML, or none: the defaults) with `section.key=value` overrides, validated."""
    raw = dict(read_raw_config(path, tuple(overrides)))
    scorers = _scorers(raw.pop("scorers", None))
    cfg = build(CurateConfig, raw, "")
    cfg.scorers = scorers
    return cfg.validate()
