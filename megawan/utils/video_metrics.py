"""Reconstruction metrics of images and videos in [-1, 1]: PSNR and SSIM, one value per sample.

    psnr(x, y)   # x, y: [B, C, H, W] or [B, C, T, H, W] in [-1, 1] -> [B] (dB)
    ssim(x, y)   # -> [B]

A video's value is the mean of its frames' values (every frame compared as an image, so an image and a clip of
its repeats score the same). SSIM is Wang et al. 2004 as scikit-image computes it
with `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`: an 11-tap Gaussian window (sigma 1.5,
truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, per channel, averaged over the pixels whose window lies inside the
image (skimage crops the 5-pixel border) and over channels. `data_range` is max - min of the value range: 2 for
[-1, 1]. Identical inputs give PSNR = inf (as skimage). Computed in fp32 (fp64 inputs stay fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scipy's gaussian_filter truncation at 3.5 sigma, as skimage uses it
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _frames(x: torch.Tensor, y: torch.Tensor, what: str):
    """[B, C, (T,) H, W] pairs -> [B, T, C, H, W] in fp32 (or fp64), checked alike."""
    if x.shape != y.shape:
        raise ValueError(f"{what}: the two inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() not in (4, 5):
        raise ValueError(f"{what}: expected [B, C, H, W] or [B, C, T, H, W], got shape {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    if x.dim() == 4:
        return x.unsqueeze(1), y.unsqueeze(1)
    return x.transpose(1, 2), y.transpose(1, 2)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, [B]: 10 log10(data_range^2 / MSE) per frame, mean over frames."""
    x, y = _frames(x, y, "psnr")
    mse = (x - y).pow(2).flatten(2).mean(dim=2)  # [B, T]
    return (10.0 * torch.log10(data_range**2 / mse)).mean(dim=1)


def _gaussian_window(dtype, device) -> torch.Tensor:
    r = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (r / SSIM_SIGMA) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity, [B]: the mean SSIM map of each channel, mean over channels, mean over frames."""
    x, y = _frames(x, y, "ssim")
    b, t, c, h, w = x.shape
    size = 2 * SSIM_RADIUS + 1
    if h < size or w < size:
        raise ValueError(f"ssim: frames of {h}x{w} are smaller than the {size}x{size} window")
    g = _gaussian_window(x.dtype, x.device)
    x, y = x.reshape(b * t * c, 1, h, w), y.reshape(b * t * c, 1, h, w)

    def blur(v):  # separable Gaussian, valid positions only (= skimage's filtered map with its border cropped)
        return F.conv2d(F.conv2d(v, g.view(1, 1, 1, size)), g.view(1, 1, size, 1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).view(b, t, c).mean(dim=(1, 2))
