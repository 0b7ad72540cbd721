"""First (and last) frames for image-to-video, sized and resampled as the official Wan repos prepare them.

    img = open_image("first.png", "--image")
    height, width = i2v_size(img.height, img.width, 720 * 1280, stride=8, patch=2)   # Wan2.1 / Wan2.2 I2V
    first = i2v_pixels(img, height, width)                       # [3, H, W] in [-1, 1], bicubic, no crop
    height, width = ti2v_size(img.height, img.width, 704 * 1280, multiple=32)        # Wan2.2 TI2V-5B
    first = ti2v_pixels(img, height, width)                      # Lanczos to cover, centre crop

The rules (wan/image2video.py, wan/first_last_frame2video.py of Wan2.1 and Wan2.2; wan/textimage2video.py and
wan/utils/utils.py `best_output_size` of Wan2.2):
- I2V / FLF2V / I2V-A14B: the video keeps the image's aspect ratio within `max_area` pixels, each side floored to
  a multiple of the VAE stride x patch; the whole image is resized to it (torch bicubic on [-1, 1], no crop, so
  the rounding stretches it by under a patch).
- TI2V-5B: of the two sizes found by flooring the width first or the height first, the one nearer the image's
  aspect ratio; the image is Lanczos-resized to cover it and centre-cropped.
A size the user asks for (--height / --width) of another aspect ratio is not stretched to: the image is centre-
cropped to that aspect ratio first (I2V), or covered and cropped (TI2V, its own rule). The FLF2V last frame is
centre-cropped to the first frame's aspect ratio (what the official code's comment says it does; its
`TF.center_crop(last, (w, h))` passes the size in the wrong order and never resizes), then resized alike.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def open_image(path: str, option: str = "--image"):
    """The RGB PIL image at `path`; a missing file, a folder or a file that is not an image is a ValueError
    naming `option` and the path."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory, not an image file")
    if not os.path.exists(path):
        raise ValueError(f"{option} {path}: no such file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{option} {path} is not a readable image ({' '.join(str(e).split())})") from None


def i2v_size(image_height: int, image_width: int, max_area: int, stride: int, patch: int) -> tuple:
    """(height, width) of an I2V video for an image of this size: its aspect ratio, about `max_area` pixels,
    latent sides floored to a multiple of the patch (Wan2.1 / Wan2.2 image2video)."""
    aspect = image_height / image_width
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"--image of {image_width}x{image_height} pixels: its aspect ratio leaves no "
                         f"{stride * patch}-pixel row or column within {max_area} pixels; give --height / --width")
    return lat_h * stride, lat_w * stride


def ti2v_size(image_height: int, image_width: int, max_area: int, multiple: int) -> tuple:
    """(height, width) of a TI2V video: within `max_area`, sides multiples of `multiple`, and of flooring the
    width first or the height first, the aspect ratio nearer the image's (Wan2.2 `best_output_size`)."""
    ratio = image_width / image_height
    exact_w = math.sqrt(max_area * ratio)
    w1 = int(exact_w // multiple * multiple)  # the width floored first, then the height that fits the area
    h2 = int((max_area / exact_w) // multiple * multiple)  # the height first
    candidates = [(w, h) for w, h in ((w1, int(max_area / w1 // multiple * multiple) if w1 else 0),
                                      (int(max_area / h2 // multiple * multiple) if h2 else 0, h2))
                  if w >= multiple and h >= multiple]  # (the official code divides by zero on a degenerate one)
    if not candidates:
        raise ValueError(f"--image of {image_width}x{image_height} pixels: its aspect ratio leaves no "
                         f"{multiple}-pixel row or column within {max_area} pixels; give --height / --width")

    def off(c):  # how far a candidate's aspect ratio is from the image's, as a factor >= 1
        return max(ratio / (c[0] / c[1]), (c[0] / c[1]) / ratio)

    w, h = min(reversed(candidates), key=off)  # a tie goes to the height-first size, as the official comparison
    return h, w


def to_tensor(img) -> torch.Tensor:
    """[3, H, W] in [-1, 1] from an RGB PIL image (torchvision's to_tensor, then (x - 0.5) / 0.5)."""
    return (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def crop_to_aspect(img, height: int, width: int):
    """The centred box of `img` with the aspect ratio height : width (the image itself when under a pixel)."""
    if abs(img.width * height - img.height * width) < max(height, width):  # differs by under a pixel
        return img
    if img.width * height > img.height * width:  # wider than asked: trim the sides
        w = round(img.height * width / height)
        left = (img.width - w) // 2
        return img.crop((left, 0, left + w, img.height))
    h = round(img.width * height / width)
    top = (img.height - h) // 2
    return img.crop((0, top, img.width, top + h))


def i2v_pixels(img, height: int, width: int) -> torch.Tensor:
    """The conditioning frame of Wan2.1 I2V / FLF2V / Wan2.2 I2V-A14B: [3, height, width] in [-1, 1], the image
    resized with torch's bicubic filter (no antialias, no clamp, as the official code)."""
    pixels = to_tensor(img)
    if tuple(pixels.shape[1:]) == (height, width):
        return pixels
    return torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bicubic")[0]


def ti2v_pixels(img, height: int, width: int) -> torch.Tensor:
    """The first frame of Wan2.2 TI2V-5B: Lanczos-resized to cover height x width, centre-cropped; [-1, 1]."""
    from PIL import Image

    scale = max(width / img.width, height / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return to_tensor(img.crop((left, top, left + width, top + height)))
