"""Videos as pictures: [-1, 1] tensors to uint8 frames, evenly spaced frames, contact sheets and captioned
sheets (PIL), small frames enlarged for a screen.

    frames = video_to_uint8(vae.decode(z)[0])          # [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]
    contact_sheet(frames, columns=4, max_frames=8).save("sheet.png")
    strip = contact_sheet(frames, max_frames=8, gap=2, min_height=128)   # 32-pixel frames shown 128 high
    captioned_rows([("a red ball rolls", strip), ...]).save("contact_sheet.png")   # the caption left of its row
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


def _as_frames(video) -> np.ndarray:
    frames = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3] with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype} (see video_to_uint8)")
    return frames


def enlarge_frames(video, min_height: int = 128, max_side: Optional[int] = None) -> np.ndarray:
    """uint8 frames [T, H, W, 3] made pleasant to look at: frames lower than `min_height` repeated pixel by pixel
    (nearest neighbour, a whole factor: a 32 x 48 frame becomes 128 x 192, its pixels sharp squares, not blur),
    and with `max_side`, frames whose longer side is above it shrunk to it (Lanczos)."""
    from PIL import Image

    frames = _as_frames(video)
    h, w = frames.shape[1:3]
    factor = max(1, -(-min_height // h))
    if max_side:
        factor = max(1, min(factor, max_side // max(h, w)))
    if factor > 1:
        frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    elif max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.LANCZOS)) for f in frames])
    return frames


def contact_sheet(video, columns: Optional[int] = None, max_frames: Optional[int] = None, gap: int = 0,
                  background=(0, 0, 0), min_height: int = 0):
    """Frames of `video` (uint8 [T, H, W, 3] or [T, H, W], numpy or torch) in a grid, row by row.

    max_frames: at most this many frames, evenly spaced (first and last kept); None = all.
    columns: frames per row (None = all in one row). gap: pixels between cells, filled with `background`.
    min_height: frames lower than this are enlarged first (enlarge_frames: a whole factor, nearest neighbour).
    The sheet is columns * W + (columns - 1) * gap wide and rows * H + (rows - 1) * gap high (W, H enlarged).
    """
    from PIL import Image

    frames = _as_frames(video)
    frames = frames[even_indices(frames.shape[0], max_frames)]
    if min_height:
        frames = enlarge_frames(frames, min_height)
    n, h, w = frames.shape[:3]
    cols = max(1, min(columns or n, n))
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), tuple(background))
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(np.ascontiguousarray(frame), "RGB"), (c * (w + gap), r * (h + gap)))
    return sheet


def captioned_rows(rows, caption_width: int = 240, gap: int = 4, font_size: int = 14, background=(24, 24, 24),
                   text=(235, 235, 235)):
    """One picture of rows (caption, PIL image), each caption written left of its image, wrapped to
    `caption_width` pixels (a word too long for a line is cut); rows `gap` pixels apart. The picture is
    caption_width + widest image wide; a row is as high as its image or its caption, whichever is higher."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 4
    pad = 8
    laid_out = []
    for caption, image in rows:
        lines = _wrap(str(caption), font, caption_width - 2 * pad)
        laid_out.append((lines, image.convert("RGB"), max(image.height, len(lines) * line_height + 2 * pad)))
    width = caption_width + max(image.width for _, image, _ in laid_out)
    height = sum(h for _, _, h in laid_out) + gap * (len(laid_out) - 1)
    sheet = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for lines, image, row_height in laid_out:
        for i, line in enumerate(lines):
            draw.text((pad, y + pad + i * line_height), line, fill=tuple(text), font=font)
        sheet.paste(image, (caption_width, y))
        y += row_height + gap
    return sheet


def _wrap(caption: str, font, width: int) -> list:
    lines, line = [], ""
    for word in caption.split():
        while len(word) > 1 and font.getlength(word) > width:  # a word longer than a line: cut where it fits
            cut = 1
            while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
                cut += 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines or [""]
