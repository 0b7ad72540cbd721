"""Fréchet Video Distance (Unterthiner et al. 2018): the Fréchet distance between Gaussians fitted to I3D features
(megawan.evaluation.i3d) of reference and generated videos.

    net = load_i3d("rgb_imagenet.pt")
    real = i3d_features(net, reference_videos)        # uint8 [T, H, W, 3] each -> float64 [N, 400]
    fake = i3d_features(net, generated_videos)
    fvd = frechet_distance(*feature_stats(real), *feature_stats(fake))

Preprocessing, as the common PyTorch FVD implementations: each frame resized to 224 x 224 (bilinear, without
keeping the aspect ratio), scaled to [-1, 1]; at most `frames` (16) frames from the start of each clip (at least
9: I3D's last pool needs them). The distance d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) is computed in
float64 through symmetric eigendecompositions (tr (S1 S2)^(1/2) = sum of the square roots of the eigenvalues of
S1^(1/2) S2 S1^(1/2), which is symmetric PSD), so it needs no scipy and stays real when the covariances are
singular (fewer videos than features, the usual case). FVD is biased by the sample count: compare numbers
measured on the same number of videos.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from megawan.evaluation.i3d import MIN_FRAMES

I3D_SIZE = 224
FVD_FRAMES = 16


def preprocess(frames: np.ndarray, frames_kept: int = FVD_FRAMES, size: int = I3D_SIZE) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, min(T, frames_kept), size, size] in [-1, 1]."""
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"FVD takes uint8 [T, H, W, 3] videos, got shape {x.shape}")
    if x.shape[0] < MIN_FRAMES:
        raise ValueError(f"FVD needs clips of at least {MIN_FRAMES} frames (I3D's last pool), got {x.shape[0]}")
    video = torch.from_numpy(np.ascontiguousarray(x[:frames_kept])).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    video = F.interpolate(video, size=(size, size), mode="bilinear", align_corners=False)
    return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)


@torch.no_grad()
def i3d_features(net, videos, batch: int = 4, frames_kept: int = FVD_FRAMES) -> np.ndarray:
    """float64 [N, classes]: `net.features` of each of `videos` (uint8 [T, H, W, 3] each; clips of one batch are
    cut to the shortest of them)."""
    device = next(net.parameters()).device
    videos = list(videos)
    out = []
    for i in range(0, len(videos), batch):
        clips = [preprocess(v, frames_kept) for v in videos[i:i + batch]]
        shortest = min(c.shape[1] for c in clips)
        out.append(net.features(torch.stack([c[:, :shortest] for c in clips]).to(device)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def feature_stats(features: np.ndarray) -> tuple:
    """(mean [D], covariance [D, D], unbiased) of features [N, D]; N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 feature vectors, got {f.shape[0] if f.ndim else 0}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (eigenvalues clamped at 0 against rounding)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the number FVD reports)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root = _sqrt_psd(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def fvd(reference: np.ndarray, generated: np.ndarray) -> float:
    """FVD between two sets of I3D features [N, D] (`i3d_features`)."""
    return frechet_distance(*feature_stats(reference), *feature_stats(generated))
