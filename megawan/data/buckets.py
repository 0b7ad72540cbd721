"""Buckets: the (frames, height, width) shapes a training stage uses. Each clip goes to the bucket nearest its
aspect ratio (then the longest that its length fills), is resized to cover the bucket and centre-cropped, so
a batch drawn from one bucket stacks without padding.

    buckets = stage_buckets("video-480")                  # or parse_buckets(["81x480x832", "1x256x256"])
    bucket = assign_bucket(buckets, frames=120, height=1080, width=1920)   # -> Bucket(81, 480, 832)
    clip = resize_center_crop(frames, bucket.height, bucket.width)             # cover_crop: the geometry
    Bucket.from_name("81x480x832").latent_shape(stride=(4, 8, 8))          # -> (21, 60, 104)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

GRID = 16  # VAE stride 8 x DiT patch 2: latent grids stay whole (Wan2.2 TI2V: 32)


@dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def is_image(self) -> bool:
        return self.frames == 1

    @classmethod
    def from_name(cls, name: str) -> "Bucket":
        """"81x480x832" -> Bucket(81, 480, 832), as a store or a batch names it (no grid check: parse_buckets)."""
        try:
            frames, height, width = (int(v) for v in name.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {name!r} is not FRAMESxHEIGHTxWIDTH") from None
        return cls(frames, height, width)

    def latent_shape(self, stride=(4, 8, 8)) -> tuple:
        """(T', H', W') of this bucket's VAE latents; stride: the VAE's (temporal, height, width) stride. The
        causal VAE encodes the first frame alone and each following `stride[0]` frames into one latent frame."""
        st, sh, sw = stride
        return (self.frames - 1) // st + 1, self.height // sh, self.width // sw


# Wan's recipe: 256 px images; 192 px 5 s 16 fps video (81 frames); then 480 px and 720 px, several aspects.
STAGE_BUCKETS = {
    "image-256": ["1x256x256", "1x224x288", "1x288x224", "1x192x336", "1x336x192"],
    "video-192": ["81x192x192", "81x160x240", "81x240x160", "81x144x256", "81x256x144"],
    "image-480": ["1x480x480", "1x480x640", "1x640x480", "1x480x832", "1x832x480"],
    "video-480": ["81x480x480", "81x480x640", "81x640x480", "81x480x832", "81x832x480"],
    "video-720": ["81x720x720", "81x720x960", "81x960x720", "81x720x1280", "81x1280x720"],
}


def parse_buckets(spec, grid: int = GRID, temporal_stride: int = 4) -> list:
    """Buckets from "FxHxW" strings or (frames, height, width) triples; sizes must fit the latent grid."""
    buckets = []
    for item in spec:
        if isinstance(item, str):
            named = Bucket.from_name(item)
            frames, height, width = named.frames, named.height, named.width
        else:
            frames, height, width = (int(v) for v in item)
        if (frames - 1) % temporal_stride:
            raise ValueError(f"bucket {item!r}: frames must be 1 + {temporal_stride}k (the causal VAE)")
        if height % grid or width % grid:
            raise ValueError(f"bucket {item!r}: height and width must be multiples of {grid}")
        buckets.append(Bucket(frames, height, width))
    if len(set(buckets)) != len(buckets):
        raise ValueError("bucket list has duplicates")
    return sorted(buckets)


def stage_buckets(*names: str) -> list:
    unknown = [n for n in names if n not in STAGE_BUCKETS]
    if unknown:
        raise ValueError(f"unknown bucket set(s) {unknown}; known: {sorted(STAGE_BUCKETS)}")
    return parse_buckets([b for n in names for b in STAGE_BUCKETS[n]])


def assign_bucket(buckets: list, frames: int, height: int, width: int) -> Optional[Bucket]:
    """The bucket for a clip of `frames` frames (1 = an image) of height x width: images go to image buckets,
    videos to the video buckets they can fill; nearest aspect ratio (in log space) first, then the most
    frames, then the largest area. None when no bucket fits (a video shorter than every video bucket)."""
    if frames == 1:
        candidates = [b for b in buckets if b.is_image]
    else:
        candidates = [b for b in buckets if not b.is_image and b.frames <= frames]
    if not candidates:
        return None
    aspect = math.log(width / height)
    return min(candidates, key=lambda b: (round(abs(math.log(b.aspect) - aspect), 6), -b.frames, -b.height * b.width))


@dataclass(frozen=True)
class CoverCrop:
    """How a frame becomes a bucket's height x width: scaled to `resized` (height, width), which covers the
    target with the aspect ratio kept up to rounding, then the height x width window at (top, left) of it, centred.
    The one geometry of the CPU path (`resize_center_crop`) and of DALI's GPU path (`megawan.data.dali`)."""

    resized: tuple
    top: int
    left: int
    height: int
    width: int


def cover_crop(source_height: int, source_width: int, height: int, width: int) -> CoverCrop:
    """The CoverCrop taking a source_height x source_width frame to height x width."""
    scale = max(height / source_height, width / source_width)
    # max(): rounding must never leave the resized frame a pixel short of the window
    resized = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
    return CoverCrop(resized, (resized[0] - height) // 2, (resized[1] - width) // 2, height, width)


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, height, width] in [-1, 1]: scaled (antialiased bilinear) to cover the
    target, then centre-cropped (`cover_crop`)."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    crop = cover_crop(video.shape[-2], video.shape[-1], height, width)
    if crop.resized != tuple(video.shape[-2:]):
        video = F.interpolate(video, size=crop.resized, mode="bilinear", antialias=True, align_corners=False)
    video = video[..., crop.top:crop.top + height, crop.left:crop.left + width]
    return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
