"""Scorers a user plugs in: aesthetic, OCR / text area, watermark, NSFW models with their own weights. None is
required; each is named in the config and rejects the clips it scores out of range, with its name as the reason.

    scorers:                                         # curate.yaml
      - name: text_area                              # the reason a rejected clip carries
        target: megawan.curation.scorers.TextArea    # module.Class or module:Class, built with options
        options: {min_height: 5}
        max: 0.1                                     # above: rejected (and / or min: below)

A scorer is a class built once per rank with the options as keyword arguments; called with the clip's key frames
(uint8 RGB [K, H, W, 3], inside the crop) it returns one float. Load model weights in __init__ (the path among its
options); the frames are a few per clip, so a batch of them is one forward pass.

TextArea is the example that needs no weights: the share of the picture covered by text-like boxes (OpenCV
morphology), a rough stand-in for an OCR model's text boxes.
"""

from __future__ import annotations

import importlib

import numpy as np

from megawan.config.fields import ConfigError


def load_target(target: str, where: str):
    """The object a dotted path names (package.module.Name or package.module:Name); ConfigError naming `where`."""
    module_name, _, name = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({e})") from None
    if not hasattr(module, name):
        raise ConfigError(f"{where}: {module_name!r} has no {name!r}")
    return getattr(module, name)


def build_scorers(configs: tuple) -> list:
    """[(ScorerConfig, scorer)] built from the config's scorers section."""
    out = []
    for i, cfg in enumerate(configs):
        cls = load_target(cfg.target, f"scorers[{i}].target")
        try:
            out.append((cfg, cls(**cfg.options)))
        except TypeError as e:
            raise ConfigError(f"scorers[{i}].options: {cfg.target} refused them ({e})") from None
    return out


def score_reasons(cfg, value: float) -> list:
    """[cfg.name] when `value` is out of the scorer's range, else []."""
    low = cfg.min is not None and value < cfg.min
    high = cfg.max is not None and value > cfg.max
    return [cfg.name] if low or high else []


class TextArea:
    """Share of the frame covered by text-like boxes, the median over the key frames: the classic morphological
    text detector (gradient, Otsu threshold, letters joined along the line by a closing), keeping boxes of one
    text line's shape (wider than twice their height, at least `min_height` px, at most `max_height` of the
    frame, neither empty nor solid). A rough stand-in for an OCR model's boxes: busy fine texture (foliage, gravel)
    joins into blobs that fail the shape test, so it misses text printed over such texture."""

    def __init__(self, min_height: int = 5, max_height: float = 0.25):
        self.min_height, self.max_height = min_height, max_height

    def share(self, frame: np.ndarray) -> float:
        import cv2

        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        edges = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
        _, edges = cv2.threshold(edges, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        lines = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (9, 1)))
        _, _, stats, _ = cv2.connectedComponentsWithStats(lines)
        mask = np.zeros((h, w), bool)
        for x, y, bw, bh, _ in stats[1:]:  # [0] is the background
            fill = float((edges[y:y + bh, x:x + bw] > 0).mean())
            if self.min_height <= bh <= self.max_height * h and bw >= 2 * bh and 0.3 <= fill <= 0.9:
                mask[y:y + bh, x:x + bw] = True
        return float(mask.mean())

    def __call__(self, frames: np.ndarray) -> float:
        return round(float(np.median([self.share(f) for f in frames])), 4) if len(frames) else 0.0
