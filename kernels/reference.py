"""The pure-torch definitions the kernels must equal (and what runs where the kernels do not)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine over the last dim, in fp32, then (1 + scale) and shift (fp32, broadcast over x)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return (y * (1 + scale.float()) + shift.float()).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (x.float() + y.float() * gate.float()).to(x.dtype)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                 eps: float) -> torch.Tensor:
    """x [s, b, hidden] -> RMSNorm over hidden (fp32, times weight), split into heads, pairs (2i, 2i + 1) rotated
    by cos / sin [s, head_dim / 2]: [s, b, heads, head_dim] in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype).float().unflatten(-1, (heads, -1)).unflatten(-1, (-1, 2))
    c, s_ = cos.float()[:, None, None, :], sin.float()[:, None, None, :]
    x1, x2 = y[..., 0], y[..., 1]
    return torch.stack([x1 * c - x2 * s_, x1 * s_ + x2 * c], dim=-1).flatten(-2).to(x.dtype)


def quantize_fp8(t: torch.Tensor, dtype: torch.dtype):
    """Per-tensor current scaling: (t · max / amax saturated and cast to dtype, the inverse scale, fp32 0-d)."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp_min(1e-12)
    scale = top / amax
    return (t.detach().float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def cast_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor cast with a given scale (the multiplier, e.g. delayed scaling's): t · scale saturated, in dtype."""
    top = torch.finfo(dtype).max
    return (t.detach().float() * scale).clamp(-top, top).to(dtype)


def cast_transpose_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(cast_fp8(t, scale, dtype), its transpose made contiguous): what kernels/fp8_transpose.py writes in one pass."""
    q = cast_fp8(t, scale, dtype)
    return q, q.t().contiguous()
