"""Scorers a user plugs in: aesthetic, OCR / text area, watermark, NSFW models with their own weights. None is
required; each is named in the config and rejects the clips it scores out of range, with its name as the reason.

    scorers:                                         # curate.yaml
      - name: text_area                              # the reason a rejected clip carries
        target: megawan.curation.scorers.TextArea    # module.Class or module:Class, built with options
        options: {min_box: 4}
        max: 0.1                                     # above: rejected (and / or min: below)

A scorer is a class built once per rank with the options as keyword arguments; called with the clip's key frames
(uint8 RGB [K, H, W, 3], inside the crop) it returns one float. Load model weights in __init__ (the path among its
options); the frames are a few per clip, so a batch of them is one forward pass.

TextArea is the example that needs no weights: the share of the picture covered by text-like regions (OpenCV's
MSER: small, stable blobs of letter size in rows), a rough stand-in for an OCR model's text boxes.
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
    """Share of the frame covered by text-like MSER regions (letter-sized, not too elongated), the median over the
    key frames."""

    def __init__(self, min_box: int = 4, max_box_share: float = 0.1):
        self.min_box, self.max_box_share = min_box, max_box_share

    def __call__(self, frames: np.ndarray) -> float:
        import cv2

        mser = cv2.MSER_create()
        shares = []
        for frame in frames:
            gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
            h, w = gray.shape
            mask = np.zeros((h, w), bool)
            _, boxes = mser.detectRegions(gray)
            for x, y, bw, bh in boxes:
                letter_sized = self.min_box <= bh <= self.max_box_share * h * 3 and bw <= 1.5 * bh
                if letter_sized:
                    mask[y:y + bh, x:x + bw] = True
            shares.append(float(mask.mean()))
        return round(float(np.median(shares)), 4) if shares else 0.0
