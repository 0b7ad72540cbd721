"""Conditioning embeddings of the Wan DiT: timestep, text and (Wan2.1 I2V) CLIP image tokens.

These are small next to the blocks, so they are plain torch modules replicated on every TP rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megawan.models.dit.norms import layer_norm_fp32, upcast


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: [cos | sin] of t * 10000^(-i / (dim/2)), i < dim/2, computed in float64.

    timesteps: any shape (Wan's units, 0-1000) -> [..., dim] float64.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = timesteps.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """t -> e (the head's modulation input) and e0 = six modulation vectors per block.

    Official names: time_embedding = (Linear, SiLU, Linear), time_projection = (SiLU, Linear(dim, 6 dim)).
    """

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.projection = nn.Linear(dim, 6 * dim)

    def forward(self, timesteps: torch.Tensor):
        """timesteps [B] or [B, L] -> e [..., dim], e0 [..., 6, dim], both float32 (modulation is fp32 in Wan)."""
        sinusoid = sinusoidal_embedding(timesteps, self.freq_dim).to(self.linear_1.weight.dtype)
        e = upcast(self.linear_2(F.silu(self.linear_1(sinusoid))))
        e0 = upcast(self.projection(F.silu(e).to(self.projection.weight.dtype)))
        return e, e0.unflatten(-1, (6, -1))


class TextEmbedding(nn.Module):
    """umT5 states -> model width: Linear, GELU(tanh), Linear."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(text), approximate="tanh"))


class ImageEmbedding(nn.Module):
    """Wan2.1 I2V: CLIP ViT-H/14 tokens (257 x 1280 per image) -> model width.

    LayerNorm, Linear, GELU, Linear, LayerNorm (official `img_emb.proj`); FLF2V adds learned positions for
    its two images (first and last frame).
    """

    def __init__(self, image_dim: int, dim: int, pos_len: int | None = None):
        super().__init__()
        self.norm_in = nn.LayerNorm(image_dim)  # eps 1e-5, as the official MLPProj
        self.linear_1 = nn.Linear(image_dim, image_dim)
        self.linear_2 = nn.Linear(image_dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, image_dim)) if pos_len else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            b, n, d = image.shape
            image = image.reshape(-1, 2 * n, d) + self.pos_embed  # FLF2V: both images' tokens side by side
        x = layer_norm_fp32(image, self.norm_in.eps, self.norm_in.weight, self.norm_in.bias).to(image.dtype)
        x = self.linear_2(F.gelu(self.linear_1(x)))
        return layer_norm_fp32(x, self.norm_out.eps, self.norm_out.weight, self.norm_out.bias).to(x.dtype)


__all__ = ["sinusoidal_embedding", "TimeEmbedding", "TextEmbedding", "ImageEmbedding"]
