"""Tiny clips with known faults for the curation tests: each kind has the report reasons it must get.

    clips = write_clip_set(folder)       # [(id, path, expected reasons)], and folder/manifest.jsonl listing them

64x48, 16 fps, 2 s (the two-shot clip 2.125 s: shots of 18 and 16 frames, cut at CUT_FRAME). The content is a
pan over a random-block texture with a moving square, sharp and mid-grey on average, so a clean clip passes every
default threshold; each fault is one change of it.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from megawan.demo.shapes import write_broken
from megawan.utils.media import read_video, write_video

H, W, T, FPS = 48, 64, 32, 16


def texture(seed: int, height: int, width: int, block: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # grey blocks, lightly tinted: natural footage's hue changes little from one frame to the next, while random
    # saturated blocks panned by a pixel score ~20 in PySceneDetect's HSV content score, next to its cut level 27
    grey = rng.integers(40, 220, size=(height // block + 1, width // block + 1, 1))
    small = np.clip(grey + rng.integers(-12, 13, size=grey.shape[:2] + (3,)), 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(small, block, axis=0), block, axis=1)[:height, :width]


def _bounce(t: int, speed: int, span: int) -> int:
    """Position at frame t of an object moving `speed` px / frame back and forth over [0, span] (no jump: a square
    that wraps round from one side to the other is a cut to a content detector)."""
    p = speed * t % (2 * span)
    return p if p <= span else 2 * span - p


def clean(seed: int, frames: int = T, height: int = H, width: int = W) -> np.ndarray:
    """A slow pan (1 px / frame) over a texture, a white square crossing it (2 px / frame)."""
    big = texture(seed, height + 8, width + frames + 8)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        out[t] = big[4:4 + height, t:t + width]
        x, y = 4 + _bounce(t, 2, width - 16), height // 3
        out[t, y:y + 10, x:x + 10] = (250 - 7 * seed % 60, 240, 60 + 11 * seed % 100)
    return out


def objects_only(seed: int) -> np.ndarray:
    """A still camera, a large square crossing the picture (3 px / frame): the objects move, not the camera."""
    out = np.repeat(texture(seed, H, W)[None], T, axis=0)
    for t in range(T):
        x = _bounce(t, 3, W - 20)
        out[t, 14:34, x:x + 20] = (230, 60, 60)
    return out


def static(seed: int, noise: int = 0) -> np.ndarray:
    """One picture held; `noise`: sensor noise of this many grey levels, new each frame."""
    still = np.repeat(texture(seed, H, W)[None].astype(np.int16), T, axis=0)
    still += np.random.default_rng(seed).integers(-noise, noise + 1, size=still.shape, dtype=np.int16)
    return np.clip(still, 0, 255).astype(np.uint8)


def shaky(seed: int, amplitude: int = 4) -> np.ndarray:
    """A hand-held camera shaking: the picture jumps up to `amplitude` px each frame, in random directions."""
    big = texture(seed, H + 16, W + 16)
    rng = np.random.default_rng(seed)
    offsets = rng.integers(-amplitude, amplitude + 1, size=(T, 2)) + 8
    return np.stack([big[dy:dy + H, dx:dx + W] for dy, dx in offsets])


def blurred(seed: int, sigma: float = 2.5) -> np.ndarray:
    import cv2

    return np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in clean(seed)])


def overexposed(seed: int, gain: float = 2.5) -> np.ndarray:
    return np.clip(clean(seed).astype(np.float32) * gain + 60, 0, 255).astype(np.uint8)


def underexposed(seed: int, gain: float = 0.04) -> np.ndarray:
    return (clean(seed).astype(np.float32) * gain).astype(np.uint8)


LETTERBOX_CROP = [0, 8, W, H - 16]  # x, y, w, h of the picture between the bars
PILLARBOX_CROP = [8, 0, W - 16, H]  # bars left and right


def letterboxed(seed: int, crop: list = LETTERBOX_CROP) -> np.ndarray:
    x, y, w, h = crop
    out = np.zeros((T, H, W, 3), np.uint8)
    out[:, y:y + h, x:x + w] = clean(seed, height=h, width=w)
    return out


CUT_FRAME = 18  # the two-scene clip's second shot starts here


def two_scenes(seed: int) -> np.ndarray:
    return np.concatenate([clean(seed)[:CUT_FRAME], clean(seed + 100)[:CUT_FRAME - 2]])


def rescaled_copy(src: str, dst: str) -> None:
    """The clip at 3/4 size, re-encoded harder (another resolution, another bitrate)."""
    import cv2

    frames = read_video(src)
    small = np.stack([cv2.resize(f, (W * 3 // 4, H * 3 // 4), interpolation=cv2.INTER_AREA) for f in frames])
    write_video(dst, small, FPS, crf=30)


# the milder second case of each fault: a threshold may miss them (the recall the test prints), never a clean clip
MILD = ("static_noisy", "shaky_mild", "blurred_mild", "overexposed_mild", "underexposed_mild", "pillarbox",
        "too_short_12")


def write_clip_set(folder: str, clean_count: int = 4, variants: bool = True) -> list:
    """Write the clips and folder/manifest.jsonl; returns [(id, path, expected reasons)]. The manifest also lists
    `past_end`, a window (start 10 s) beyond clean0's end: a zero-length clip."""
    os.makedirs(folder, exist_ok=True)
    made = []

    def add(name, frames, reasons):
        path = os.path.join(folder, name + ".mp4")
        write_video(path, frames, fps=FPS)
        made.append((name, path, reasons))

    for i in range(clean_count):
        add(f"clean{i}", clean(i + 1), [])
    add("static", static(20), ["static"])
    add("shaky", shaky(21), ["shaky"])
    add("blurred", blurred(22), ["blurry"])
    add("overexposed", overexposed(23), ["overexposed"])
    add("underexposed", underexposed(24), ["underexposed"])
    add("letterbox", letterboxed(25), ["letterbox"])
    add("two_scenes", two_scenes(26), [])
    add("too_short", clean(27, frames=8), ["too_short"])
    if variants:  # a second, milder case of each fault, and a clip whose objects (not the camera) move
        add("objects_only", objects_only(30), [])
        add("static_noisy", static(31, noise=3), ["static"])
        add("shaky_mild", shaky(32, amplitude=2), ["shaky"])
        add("blurred_mild", blurred(33, sigma=1.6), ["blurry"])
        add("overexposed_mild", overexposed(34, gain=1.8), ["overexposed"])
        add("underexposed_mild", underexposed(35, gain=0.08), ["underexposed"])
        add("pillarbox", letterboxed(36, PILLARBOX_CROP), ["letterbox"])
        add("too_short_12", clean(37, frames=12), ["too_short"])
    exact = os.path.join(folder, "copy_exact.mp4")
    shutil.copyfile(made[0][1], exact)
    made.append(("copy_exact", exact, ["duplicate"]))
    rescaled = os.path.join(folder, "copy_rescaled.mp4")
    rescaled_copy(made[0][1], rescaled)
    made.append(("copy_rescaled", rescaled, ["duplicate"]))
    for kind, reason in (("garbage", "undecodable"), ("empty", "zero_length"), ("audio_only", "no_video")):
        path = os.path.join(folder, f"broken_{kind}.mp4" if kind != "audio_only" else "broken_audio.m4a")
        write_broken(path, kind)
        made.append((os.path.splitext(os.path.basename(path))[0], path, [reason]))
    rows = [{"id": name, "path": os.path.basename(path), "caption": f"clip {name}"} for name, path, _ in made]
    rows.append({"id": "past_end", "path": "clean0.mp4", "caption": "a window after the end", "start": 10, "end": 12})
    made.append(("past_end", made[0][1], ["zero_length"]))
    with open(os.path.join(folder, "manifest.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return made
