"""The synthetic suite: does a generated clip show what its caption asks, "a <colour> <shape> moves <direction>"?
Three checks per clip, each against the word its caption names (megawan.demo.shapes draws the training clips):

    colour     megawan.demo.shapes.dominant_color: the palette colour of the shape pixels
    shape      `shape_of` (below): circle / square / triangle from the shape's outline in each frame
    direction  megawan.demo.shapes.motion_direction: where the shape's centroid travels, first to last frame

    rows = [score_clip(frames, "a red circle moves left", sample_id="0")]   # frames uint8 [T, H, W, 3]
    summary = suite_accuracy(rows)    # {"color": 1.0, "shape": 1.0, "direction": 1.0, "samples": rows, ...}

A clip is right on a check when what is measured equals what the caption names; an accuracy is over the clips
whose caption names that attribute (None when none does). `suite_prompts(n)` is the fixed prompt set `megawan
eval --suite synthetic` samples: every colour, shape and direction equally often, the same list on every run, so
that runs on different checkpoints are scored on the same prompts.
"""

from __future__ import annotations

import re

import numpy as np

from megawan.demo.shapes import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    FOREGROUND_DISTANCE,
    MIN_FOREGROUND_PIXELS,
    SHAPES,
    ShapeClip,
    caption_color,
    caption_direction,
    dominant_color,
    motion_direction,
)

CHECKS = ("color", "shape", "direction")
SUITE_SIZE = 12  # the default prompt count: each of 6 colours twice, 3 shapes 4 times, 4 directions 3 times

# shape_of's decision, measured on renders (megawan.demo.shapes.render, 72 clips at 32x48 and 64x64, raw and
# through H.264): a square fills its bounding box (1.0), a circle pi / 4 of it (0.75-0.88 on a small pixel grid),
# an upward triangle about half of it (0.53-0.62) and holds about a third of its pixels above its middle row
# (top / bottom 0.32-0.40; circle and square ~1). The thresholds sit between the classes, so that a blurred
# decode (rounded corners, soft edges) still reads as its shape.
SQUARE_FILL = 0.94
TRIANGLE_TOP_BOTTOM = 0.65
TRIANGLE_FILL = 0.68


def suite_prompts(n: int = SUITE_SIZE) -> list:
    """`n` captions: prompt i has colour i mod 6, direction i mod 4 and shape (i + i // 6) mod 3 (the shape steps
    on by one every 6 prompts, so a colour does not always come with the same shape). 12 prompts hold each colour
    twice (in two shapes), each shape 4 times and each direction 3 times."""
    colors, directions = list(COLORS), list(DIRECTIONS)
    return [ShapeClip(colors[i % len(colors)], SHAPES[(i + i // len(colors)) % len(SHAPES)],
                      directions[i % len(directions)]).caption for i in range(n)]


def caption_shape(caption: str) -> str | None:
    """The shape a caption names: its first whole word that is one of SHAPES; None when it names none."""
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in SHAPES:
            return word
    return None


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean [H, W] mask (stray pixels of a generated frame dropped)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return mask.copy()
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # grow inside the mask's box: fewer pixels
    out = np.zeros_like(mask)
    out[box] = _largest_in(mask[box])
    return out


def _largest_in(mask: np.ndarray) -> np.ndarray:
    left = mask.copy()
    best = np.zeros_like(mask)
    while left.any():
        region = np.zeros_like(mask)
        region[tuple(np.argwhere(left)[0])] = True
        while True:  # grow by one pixel in the four directions, inside the mask, until it stops growing
            grown = region.copy()
            grown[1:] |= region[:-1]
            grown[:-1] |= region[1:]
            grown[:, 1:] |= region[:, :-1]
            grown[:, :-1] |= region[:, 1:]
            grown &= left
            if grown.sum() == region.sum():
                break
            region = grown
        left &= ~region
        if region.sum() > best.sum():
            best = region
    return best


def outline_features(mask: np.ndarray) -> tuple:
    """(fill, top / bottom) of a boolean [H, W] shape mask: its pixels over its bounding box's, and its pixels
    above the box's middle row over those below it."""
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    middle = (ys.min() + ys.max()) / 2
    return float(mask.sum() / (height * width)), float((ys < middle).sum() / max((ys > middle).sum(), 1))


def shape_of(frames: np.ndarray, threshold: float = FOREGROUND_DISTANCE,
             min_pixels: int = MIN_FOREGROUND_PIXELS) -> str | None:
    """The shape (one of SHAPES) that uint8 RGB frames [T, H, W, 3] (or one [H, W, 3]) show, or None.

    1. the shape's colour: the median offset from BACKGROUND of the pixels dominant_color counts as shape (RGB
       distance over `threshold`), over all frames;
    2. per frame, the shape's pixels: those at least half-way from the background to that colour (projected on
       the line between them). The half-contrast edge is where a blurred or compressed edge really is: a fixed
       threshold keeps the halo that video compression leaves around a bright shape, which squares a circle;
    3. their largest 4-connected region and its `outline_features`; a frame with fewer than `min_pixels` such
       pixels, or whose region touches the frame's edge (a shape leaving the picture is cut), does not count;
    4. the median of the features over the counted frames decides: top / bottom under TRIANGLE_TOP_BOTTOM or
       fill under TRIANGLE_FILL -> triangle; fill over SQUARE_FILL -> square; else circle.

    None when no frame counts."""
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"shape_of needs [T, H, W, 3] or [H, W, 3] RGB frames, got shape {x.shape}")
    offset = x.astype(np.float64) - np.asarray(BACKGROUND, dtype=np.float64)
    foreground = np.linalg.norm(offset, axis=-1) > threshold
    if foreground.sum() < max(1, min_pixels):
        return None
    color = np.median(offset[foreground], axis=0)
    features = []
    for mask in offset @ color / (color @ color) >= 0.5:
        if mask.sum() < max(1, min_pixels):
            continue
        region = _largest_component(mask)
        if region.sum() < max(1, min_pixels) or region[0].any() or region[-1].any() or region[:, 0].any() \
                or region[:, -1].any():
            continue
        features.append(outline_features(region))
    if not features:
        return None
    fill, top_bottom = np.median(np.asarray(features), axis=0)
    if top_bottom < TRIANGLE_TOP_BOTTOM or fill < TRIANGLE_FILL:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def score_clip(frames: np.ndarray, caption: str, sample_id: str | None = None) -> dict:
    """One row: for each check what the caption names ("expected_<check>", None when it names none) and what the
    frames show ("<check>"), and whether they agree ("<check>_ok", None when the caption names nothing)."""
    expected = {"color": caption_color(caption), "shape": caption_shape(caption),
                "direction": caption_direction(caption)}
    found = {"color": dominant_color(frames), "shape": shape_of(frames),
             "direction": motion_direction(frames) if np.asarray(frames).ndim == 4 else None}
    row = {"id": sample_id, "caption": caption}
    for check in CHECKS:
        row[f"expected_{check}"] = expected[check]
        row[check] = found[check]
        row[f"{check}_ok"] = None if expected[check] is None else expected[check] == found[check]
    return row


def suite_accuracy(rows: list) -> dict:
    """{"<check>": share right over the rows whose caption names it (None when none does), "<check>_correct",
    "<check>_total", "samples": rows} for each of CHECKS."""
    out = {}
    for check in CHECKS:
        judged = [r[f"{check}_ok"] for r in rows if r[f"{check}_ok"] is not None]
        out[check] = sum(judged) / len(judged) if judged else None
        out[f"{check}_correct"], out[f"{check}_total"] = sum(judged), len(judged)
    out["samples"] = rows
    return out
