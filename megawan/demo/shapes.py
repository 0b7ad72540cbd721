"""Synthetic videos of moving coloured shapes, whose captions name the colour, shape and direction:
the tiny end-to-end job and the tests learn and check against them; the colour metric that checks what a
model generated; and broken files that a decoder must skip.

    write_synthetic_dataset("data/shapes", count=200, frames=33, height=64, width=64, broken=10)
    -> data/shapes/*.mp4 and data/shapes/manifest.jsonl
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np

from megawan.utils.media import write_video

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
          "purple": (150, 60, 200), "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (24, 24, 28)
# Colours no pre-training sees (the demo and the trainer tests draw from COLORS only, and the tokenizer learns
# their words only): the LoRA task (megawan.demo.lora_task) teaches one of them to a pre-trained model.
UNSEEN_COLORS = {"orange": (245, 140, 20)}
PALETTE = {**COLORS, **UNSEEN_COLORS}  # every colour `render` draws


@dataclass(frozen=True)
class ShapeClip:
    color: str
    shape: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moves {self.direction}"


def render(clip: ShapeClip, frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 frames [T, H, W, 3]: the shape crosses the frame in its direction over the clip."""
    rng = random.Random(seed)
    size = max(4, min(height, width) // 4)
    dx, dy = DIRECTIONS[clip.direction]
    # start on one side, travel about half the frame
    cx = width / 2 - dx * width / 4 + rng.uniform(-width / 10, width / 10)
    cy = height / 2 - dy * height / 4 + rng.uniform(-height / 10, height / 10)
    speed = (min(height, width) / 2) / max(frames - 1, 1)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        x, y = cx + dx * speed * t, cy + dy * speed * t
        if clip.shape == "circle":
            inside = (xx - x) ** 2 + (yy - y) ** 2 <= (size / 2) ** 2
        elif clip.shape == "square":
            inside = (abs(xx - x) <= size / 2) & (abs(yy - y) <= size / 2)
        else:  # triangle pointing up
            top = y - size / 2
            inside = (yy >= top) & (yy <= y + size / 2) & (abs(xx - x) <= (yy - top) / 2)
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[:] = BACKGROUND
        frame[inside] = PALETTE[clip.color]
        out[t] = frame
    return out


# ----------------------------------------------------------------------------------------------
# The colour metric: which palette colour a (generated or decoded) frame shows, and which one a caption names.

FOREGROUND_DISTANCE = 60.0  # RGB (0-255) Euclidean distance from BACKGROUND beyond which a pixel is "shape"
MIN_FOREGROUND_PIXELS = 8


def dominant_color(frames: np.ndarray, threshold: float = FOREGROUND_DISTANCE,
                   min_pixels: int = MIN_FOREGROUND_PIXELS, palette: dict = COLORS) -> str | None:
    """The palette colour (a key of `palette`, COLORS by default) that the shape pixels of `frames` show, or None.

    `frames` is uint8 RGB, [T, H, W, 3] (a clip: all frames are pooled) or [H, W, 3] (one image).
    Measured in three steps:

    1. foreground: the pixels whose Euclidean RGB distance (0-255 scale) from BACKGROUND (24, 24, 28) exceeds
       `threshold` (60 by default; every palette colour is 180-280 away from the background, so a shape's
       pixels pass even when a decoder dims or blurs them to a third of their contrast, and near-background
       noise does not);
    2. their typical colour: the per-channel median RGB of those pixels (robust to blurred edges and stray
       pixels);
    3. the palette entry whose blend line with the background passes closest to that median: for each colour
       c the distance from the median to the segment BACKGROUND -> c (points BACKGROUND + a (c - BACKGROUND),
       0 <= a <= 1), the smallest wins. A pure palette pixel is at distance 0 from its own colour's segment;
       allowing the blend makes a shape whose edges are mixed with the dark background (anti-aliasing, a
       blurry decode) still read as its hue rather than as a darker neighbour (e.g. a dimmed cyan as green).

    None when fewer than `min_pixels` (8 by default) pixels are foreground: no shape is visible.
    """
    x = np.asarray(frames)
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"dominant_color needs [T, H, W, 3] or [H, W, 3] RGB frames, got shape {x.shape}")
    pixels = x.reshape(-1, 3).astype(np.float64)
    background = np.asarray(BACKGROUND, dtype=np.float64)
    foreground = pixels[np.linalg.norm(pixels - background, axis=1) > threshold]
    if len(foreground) < max(1, min_pixels):
        return None
    median = np.median(foreground, axis=0) - background
    best, best_distance = None, np.inf
    for name, rgb in palette.items():
        direction = np.asarray(rgb, dtype=np.float64) - background
        a = float(np.clip(median @ direction / (direction @ direction), 0.0, 1.0))
        distance = float(np.linalg.norm(median - a * direction))
        if distance < best_distance:
            best, best_distance = name, distance
    return best


def caption_color(caption: str, palette: dict = COLORS) -> str | None:
    """The palette colour a caption names: the first whole word of `caption` (case-insensitive) that is a key
    of `palette` (COLORS by default; "a red circle moves left" -> "red"); None when it names none."""
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in palette:
            return word
    return None


def caption_direction(caption: str) -> str | None:
    """The direction a caption names: its first whole word that is a key of DIRECTIONS; None when it names none."""
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in DIRECTIONS:
            return word
    return None


MIN_TRAVEL_PIXELS = 3.0  # a shape whose centroid moves less than this between first and last frame is not moving


def centroid_track(frames: np.ndarray, threshold: float = FOREGROUND_DISTANCE,
                   min_pixels: int = MIN_FOREGROUND_PIXELS) -> list:
    """(x, y) centroid of the shape pixels (as `dominant_color` finds them) of each frame of [T, H, W, 3] uint8
    frames; None for a frame with fewer than `min_pixels` of them."""
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"centroid_track needs [T, H, W, 3] RGB frames, got shape {x.shape}")
    distance = np.linalg.norm(x.astype(np.float64) - np.asarray(BACKGROUND, dtype=np.float64), axis=-1)
    track = []
    for mask in distance > threshold:
        if mask.sum() < max(1, min_pixels):
            track.append(None)
            continue
        yy, xx = np.nonzero(mask)
        track.append((float(xx.mean()), float(yy.mean())))
    return track


def motion_direction(frames: np.ndarray, min_travel: float = MIN_TRAVEL_PIXELS) -> str | None:
    """Where the shape of a clip moves (a key of DIRECTIONS): the larger axis of the displacement of its centroid
    (`centroid_track`) from the first to the last frame that shows it, by its sign (image y grows downwards).
    None when fewer than two frames show a shape or it travels less than `min_travel` pixels."""
    seen = [c for c in centroid_track(frames) if c is not None]
    if len(seen) < 2:
        return None
    dx, dy = seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1]
    if max(abs(dx), abs(dy)) < min_travel:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


BROKEN_KINDS = ("truncated", "empty", "garbage", "audio_only")


def write_broken(path: str, kind: str, good_video: str | None = None) -> None:
    """Files a decoder must skip: a truncated mp4, an empty file, random bytes, an audio-only file."""
    if kind == "truncated":
        data = open(good_video, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "garbage":
        open(path, "wb").write(os.urandom(4096))
    elif kind == "audio_only":
        import av

        with av.open(path, mode="w") as container:
            stream = container.add_stream("aac", rate=16000)
            samples = (np.sin(np.linspace(0, 200, 16000)) * 0.2).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        raise ValueError(f"unknown broken kind {kind!r}; one of {BROKEN_KINDS}")


def write_synthetic_dataset(out_dir: str, count: int, frames: int = 33, height: int = 64, width: int = 64,
                            fps: int = 16, broken: int = 0, seed: int = 0, codec: str = "libx264") -> str:
    """Write `count` clips (+ `broken` bad files) and manifest.jsonl listing them all; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    ext = "webm" if "vp" in codec else "mp4"
    rows = []
    for i in range(count):
        clip = ShapeClip(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)))
        name = f"clip_{i:05d}.{ext}"
        write_video(os.path.join(out_dir, name), render(clip, frames, height, width, seed=seed * 100003 + i), fps, codec)
        rows.append({"id": f"clip_{i:05d}", "path": name, "caption": clip.caption})
    for j in range(broken):
        kind = BROKEN_KINDS[j % len(BROKEN_KINDS)]
        name = f"broken_{j:03d}_{kind}.{'m4a' if kind == 'audio_only' else ext}"
        write_broken(os.path.join(out_dir, name), kind, good_video=os.path.join(out_dir, rows[0]["path"]) if rows else None)
        rows.append({"id": f"broken_{j:03d}", "path": name, "caption": f"broken file ({kind})"})
    manifest = os.path.join(out_dir, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return manifest
