"""Videos as pictures: [-1, 1] tensors to uint8 frames, evenly spaced frames, contact sheets (PIL).

    frames = video_to_uint8(vae.decode(z)[0])          # [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]
    contact_sheet(frames, columns=4, max_frames=8).save("sheet.png")
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """One video [3, T, H, W] (or [T, H, W] grey / [1, 3, T, H, W]) in [-1, 1] -> uint8 [T, H, W, 3]."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"one video at a time, got a batch of {video.shape[0]}")
        video = video[0]
    if video.dim() == 3:
        video = video.unsqueeze(0).expand(3, -1, -1, -1)
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got {tuple(video.shape)}")
    x = ((video.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def even_indices(total: int, count: Optional[int]) -> list:
    """`count` frame indices spread evenly over 0 .. total - 1, first and last included (all if count >= total)."""
    if total <= 0:
        return []
    if count is None or count >= total:
        return list(range(total))
    if count <= 1:
        return [0]
    return sorted({int(round(i * (total - 1) / (count - 1))) for i in range(count)})


def contact_sheet(video, columns: Optional[int] = None, max_frames: Optional[int] = None, gap: int = 0,
                  background=(0, 0, 0)):
    """Frames of `video` (uint8 [T, H, W, 3] or [T, H, W], numpy or torch) in a grid, row by row.

    max_frames: at most this many frames, evenly spaced (first and last kept); None = all.
    columns: frames per row (None = all in one row). gap: pixels between cells, filled with `background`.
    The sheet is columns * W + (columns - 1) * gap wide and rows * H + (rows - 1) * gap high.
    """
    from PIL import Image

    frames = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3] with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype} (see video_to_uint8)")
    frames = frames[even_indices(frames.shape[0], max_frames)]
    n, h, w = frames.shape[:3]
    cols = max(1, min(columns or n, n))
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), tuple(background))
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(np.ascontiguousarray(frame), "RGB"), (c * (w + gap), r * (h + gap)))
    return sheet
