"""3D rotary position embedding of Wan: the head dim is split into (t, h, w) parts, each rotated by its
own axis' position, on adjacent channel pairs (x[2i], x[2i+1]) as Wan's complex-number form does.

Angles are computed in float64 from global (frame, row, column) patch indices, so a context-parallel rank
that holds a slice of the sequence slices these tables instead of recomputing local positions.
"""

from __future__ import annotations

import torch


def rope_angles(grid: tuple, split: tuple, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles for every token of an (f, h, w) patch grid, frame-major: [f*h*w, head_dim/2] float64."""
    parts = []
    for axis, (n, dim) in enumerate(zip(grid, split)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angle = torch.arange(n, dtype=torch.float64, device=device)[:, None] * freqs  # [n, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        parts.append(angle.view(shape).expand(*grid, dim // 2))
    return torch.cat(parts, dim=-1).reshape(-1, sum(split) // 2)


def rope_cos_sin(grid: tuple, split: tuple, theta: float = 10000.0, device=None, dtype=torch.float32):
    """cos, sin tables [s, 1, 1, head_dim/2] (float32), broadcastable over [s, b, heads, head_dim/2]."""
    angles = rope_angles(grid, split, theta, device)
    return torch.cos(angles).to(dtype)[:, None, None, :], torch.sin(angles).to(dtype)[:, None, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [s, b, heads, head_dim] pairwise (x[2i], x[2i+1]) by the angles, in the tables' dtype."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)
