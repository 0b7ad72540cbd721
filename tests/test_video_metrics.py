"""PSNR and SSIM of megawan.utils.video_metrics against scikit-image's (the reference implementation)."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from megawan.utils.video_metrics import psnr, ssim


def _pair(shape, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x, y


def _skimage_frame(a: torch.Tensor, b: torch.Tensor):
    """(psnr, ssim) of one [C, H, W] frame pair, by scikit-image."""
    a, b = a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()
    s = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0,
                              channel_axis=2)
    return peak_signal_noise_ratio(a, b, data_range=2.0), s


def test_images_match_skimage():
    x, y = _pair((3, 3, 16, 24))
    ref = np.array([_skimage_frame(x[i], y[i]) for i in range(3)])
    assert torch.allclose(psnr(x, y), torch.from_numpy(ref[:, 0]), rtol=0, atol=1e-10)
    assert torch.allclose(ssim(x, y), torch.from_numpy(ref[:, 1]), rtol=0, atol=1e-10)
    # fp32 inputs, fp32 arithmetic
    assert torch.allclose(ssim(x.float(), y.float()).double(), torch.from_numpy(ref[:, 1]), rtol=0, atol=1e-5)
    assert torch.allclose(psnr(x.float(), y.float()).double(), torch.from_numpy(ref[:, 0]), rtol=0, atol=1e-4)


def test_video_is_the_mean_over_frames():
    x, y = _pair((2, 3, 5, 16, 16), seed=1, noise=0.1)
    ref = np.array([[_skimage_frame(x[i, :, t], y[i, :, t]) for t in range(5)] for i in range(2)]).mean(axis=1)
    assert torch.allclose(psnr(x, y), torch.from_numpy(ref[:, 0]), rtol=0, atol=1e-10)
    assert torch.allclose(ssim(x, y), torch.from_numpy(ref[:, 1]), rtol=0, atol=1e-10)
    # a clip of one repeated frame scores as that image
    still = torch.stack([x[:, :, 0]] * 3, dim=2), torch.stack([y[:, :, 0]] * 3, dim=2)
    assert torch.allclose(ssim(*still), ssim(x[:, :, 0], y[:, :, 0]), rtol=0, atol=1e-12)
    assert torch.allclose(psnr(*still), psnr(x[:, :, 0], y[:, :, 0]), rtol=0, atol=1e-12)


def test_identical_and_bad_shapes():
    x, _ = _pair((1, 3, 12, 12))
    assert torch.isinf(psnr(x, x)).all() and torch.allclose(ssim(x, x), torch.ones(1, dtype=x.dtype))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(x, x[:, :, :11])
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(x[:, :, :8, :8], x[:, :, :8, :8])
