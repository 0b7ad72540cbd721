"""Measures of one clip's picture: black borders (the letterbox crop), exposure, sharpness, stillness.

    crop = border_crop(clip.keys, border_luma=24)          # [x, y, w, h] of the picture inside black bars
    measures = picture_measures(clip.keys, crop, side=256) # overexposed, underexposed, blur

All on the key frames (full size, a few per clip), inside the crop: the bars of a letterboxed clip are neither
under-exposure nor a sharp edge. The units are in megawan/config/curate.py.
"""

from __future__ import annotations

import numpy as np

from megawan.curation.frames import small_size

WHITE, BLACK = 250, 10  # luma at or beyond which a pixel is clipped


def luma(frames: np.ndarray) -> np.ndarray:
    """float32 [..., H, W] BT.601 luma of uint8 RGB frames."""
    return frames[..., 0] * np.float32(0.299) + frames[..., 1] * np.float32(0.587) + frames[..., 2] * np.float32(0.114)


def border_crop(keys: np.ndarray, border_luma: int = 24) -> list:
    """[x, y, w, h]: the largest box whose outer rows / columns are not black in some key frame. A row is black
    when its mean luma, in every key frame, is at most `border_luma` (a dark scene is not a bar: it is dark in
    some frames only, or not in whole rows). The whole frame when every row is black (an underexposed clip)."""
    y = luma(keys)
    rows = (y.mean(axis=2) > border_luma).any(axis=0)  # [H]: a row with picture in some key frame
    cols = (y.mean(axis=1) > border_luma).any(axis=0)  # [W]
    height, width = rows.shape[0], cols.shape[0]
    if not rows.any() or not cols.any():
        return [0, 0, width, height]
    top, bottom = int(np.argmax(rows)), int(height - np.argmax(rows[::-1]))
    left, right = int(np.argmax(cols)), int(width - np.argmax(cols[::-1]))
    return [left, top, right - left, bottom - top]


def border_share(crop: list, width: int, height: int) -> float:
    """The black share of the height or of the width, whichever is larger (both bars of a side summed)."""
    return max(1 - crop[3] / height, 1 - crop[2] / width)


def picture_measures(keys: np.ndarray, crop: list, side: int = 256) -> dict:
    import cv2

    x, y0, w, h = crop
    inside = keys[:, y0:y0 + h, x:x + w]
    y = luma(inside)
    size = small_size(w, h, side)  # sharpness at one scale for every resolution
    blur = [float(cv2.Laplacian(cv2.resize(frame, size, interpolation=cv2.INTER_AREA), cv2.CV_32F).var())
            for frame in y]
    return {"overexposed": round(float((y >= WHITE).mean()), 4), "underexposed": round(float((y <= BLACK).mean()), 4),
            "blur": round(float(np.median(blur)), 3)}
