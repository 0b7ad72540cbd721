"""The GAN stage's discriminator: a 3D PatchGAN (pix2pix / taming-transformers' NLayerDiscriminator with 3D convs).

    critic = Discriminator3D(channels=3, base=64, layers=3)
    logits = critic(video)       # [B, 3, T, H, W] in [-1, 1] -> [B, 1, T', H', W'] real / fake logits per patch

A stack of stride-2 Conv3d (kernel 3 in time, 4 in space) with LeakyReLU(0.2), then a stride-1 conv and the
one-channel output conv. GroupNorm instead of PatchGAN's BatchNorm: it normalises each sample on its own, so a
data-parallel run computes what one rank computes (BatchNorm's batch statistics would depend on the DP slice).
An image (T = 1) goes through the same net: the time kernel's padding of 1 on each side keeps T' = 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _groups(channels: int) -> int:
    """The most GroupNorm groups (up to 32) that divide `channels`."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def _block(c_in: int, c_out: int, stride: int, norm: bool) -> list:
    conv = nn.Conv3d(c_in, c_out, kernel_size=(3, 4, 4), stride=(stride, stride, stride), padding=1, bias=not norm)
    return [conv] + ([nn.GroupNorm(_groups(c_out), c_out)] if norm else []) + [nn.LeakyReLU(0.2)]


class Discriminator3D(nn.Module):
    def __init__(self, channels: int = 3, base: int = 64, layers: int = 3):
        super().__init__()
        mods = _block(channels, base, 2, norm=False)
        width = base
        for n in range(1, layers):
            out = base * min(2 ** n, 8)
            mods += _block(width, out, 2, norm=True)
            width = out
        out = base * min(2 ** layers, 8)
        mods += _block(width, out, 1, norm=True)
        mods.append(nn.Conv3d(out, 1, kernel_size=(3, 4, 4), stride=1, padding=1))
        self.net = nn.Sequential(*mods)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """taming-transformers' init: conv weights N(0, 0.02), norm weights N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.normal_(0.0, 0.02, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)

    def min_size(self) -> int:
        """The smallest height / width that leaves at least one output patch."""
        for size in range(1, 1025):
            h = size
            for m in self.net:
                if isinstance(m, nn.Conv3d):
                    h = (h + 2 - 4) // m.stride[1] + 1
                    if h < 1:
                        break
            if h >= 1:
                return size
        return 1025
