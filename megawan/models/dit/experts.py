"""Wan2.2 A14B: two experts of the same architecture, chosen per sample by the timestep.

The high-noise expert takes t >= boundary x 1000 (early, noisy steps: layout and motion), the low-noise
expert the rest (detail). Official layout: high_noise_model/ and low_noise_model/; diffusers: transformer
(high) and transformer_2 (low) with boundary_ratio.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megawan.config import DiTConfig
from megawan.models.dit.model import WanDiT


class WanDiTExperts(nn.Module):
    def __init__(self, config: DiTConfig, tp_group=None):
        super().__init__()
        if config.expert_boundary is None:
            raise ValueError(f"{config.name}: expert_boundary is not set; a single-expert model is WanDiT(config)")
        self.boundary = config.expert_boundary * 1000.0
        self.high_noise = WanDiT(config, tp_group=tp_group)
        self.low_noise = WanDiT(config, tp_group=tp_group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        out = self.high_noise.sharded_state_dict(f"{prefix}high_noise.", sharded_offsets, metadata)
        out.update(self.low_noise.sharded_state_dict(f"{prefix}low_noise.", sharded_offsets, metadata))
        return out

    def expert_for(self, timestep: torch.Tensor) -> torch.Tensor:
        """Bool [B]: True where the high-noise expert runs (per-token t: its largest value decides)."""
        t = timestep if timestep.dim() == 1 else timestep.amax(dim=1)
        return t >= self.boundary

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                image: Optional[torch.Tensor] = None) -> torch.Tensor:
        high = self.expert_for(timestep)
        if bool(high.all()) or bool((~high).all()):
            expert = self.high_noise if bool(high[0]) else self.low_noise
            return expert(latents, timestep, text, image)
        out = None
        for mask, expert in ((high, self.high_noise), (~high, self.low_noise)):
            idx = mask.nonzero(as_tuple=True)[0]
            part = expert(latents[idx], timestep[idx], text[idx], None if image is None else image[idx])
            if out is None:
                out = part.new_empty((latents.shape[0], *part.shape[1:]))
            out[idx] = part
        return out
