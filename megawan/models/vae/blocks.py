"""Building blocks of the Wan-VAE (2.1 and 2.2), named as diffusers' AutoencoderKLWan names them so that
our state dict is diffusers' (conversion to the official names is a table in megawan.convert)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megawan.models.vae.causal import CausalConv3d, StreamCache


class RMSNorm(nn.Module):
    """Channel RMS norm: x / ||x||_channels * sqrt(C) * gamma (computed in fp32 for half inputs)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


def _each_frame_as_first(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3D op to every frame of [B, C, T, H, W] as to a one-frame stream (the image VAE's shortcuts)."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, 1, h, w))  # [b t, c', 1, h', w']
    return y.reshape(b, t, y.shape[1], *y.shape[3:]).transpose(1, 2)


def conv3x3(in_dim: int, out_dim: int, time_kernel: int = 3) -> CausalConv3d:
    """The VAE's 3x3 causal conv; time kernel 3, or 1 in the image VAE (config.image_only: a 2D conv per frame)."""
    return CausalConv3d(in_dim, out_dim, (time_kernel, 3, 3), padding=((time_kernel - 1) // 2, 1, 1))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, time_kernel: int = 3):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = conv3x3(in_dim, out_dim, time_kernel)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = conv3x3(out_dim, out_dim, time_kernel)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), cache)
        x = self.conv2(F.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        def attend(frames):
            n, c, h, w = frames.shape
            q, k, v = self.to_qkv(self.norm(frames)).reshape(n, 1, c * 3, h * w).transpose(2, 3).chunk(3, dim=-1)
            out = F.scaled_dot_product_attention(q, k, v)  # [n, 1, hw, c]
            return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

        return x + _per_frame(attend, x)


class MidBlock(nn.Module):
    def __init__(self, dim: int, time_kernel: int = 3):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, time_kernel), ResidualBlock(dim, dim, time_kernel)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Upsample2x(nn.Upsample):
    """Nearest-exact 2x spatial upsampling in fp32, cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Spatial 2x down / up sampling, optionally with 2x in time (causal; the first frame of a stream is
    never resampled in time: 1 + 4k frames <-> 1 + k latent frames)."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, upsample_out_dim or dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x, cache):
        # frame 0 of the stream stays one frame; every later frame becomes two (a causal conv emits both)
        first = None
        if cache.first_call(self):
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
            x = torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)
        return x if first is None else torch.cat([first, x], dim=2)

    def _downsample_time(self, x, cache):
        # stride-2 windows [f0 f1 f2], [f2 f3 f4], …; frame 0 of the stream also passes through alone
        previous = cache.get(self)
        cache.put(self, x[:, :, -1:].clone())
        if previous is None:
            return x if x.shape[2] == 1 else torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return self.time_conv(torch.cat([previous, x], dim=2))


class AvgDown3D(nn.Module):
    """Wan2.2's parameter-free shortcut: average space-time blocks into channels (front-padded in time)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.group_size = in_channels * factor_t * factor_s * factor_s // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group_size, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Wan2.2's parameter-free shortcut: channels back into space-time blocks by repetition."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.view(b, self.out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """Wan2.2 encoder level: residual blocks, optional down-sampling, plus the averaging shortcut.

    image_only: time kernel 1, no temporal down-sampling; the shortcut treats every frame as its 3D twin treats a
    stream's first frame (front-padded in time), so that the inflated 3D VAE reproduces this one on images."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool,
                 image_only: bool = False):
        super().__init__()
        self.image_only = image_only
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if down else 1)
        kt = 1 if image_only else 3
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, kt)
                                     for i in range(num_res_blocks))
        mode = "downsample3d" if temporal and not image_only else "downsample2d"
        self.downsampler = Resample(out_dim, mode) if down else None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        shortcut = _each_frame_as_first(self.avg_shortcut, x) if self.image_only else self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """Wan2.1 decoder level: residual blocks then optional up-sampling (which halves the channels)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None,
                 time_kernel: int = 3):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, time_kernel)
                                     for i in range(num_res_blocks + 1))
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class ResidualUpBlock(nn.Module):
    """Wan2.2 decoder level: residual blocks, optional up-sampling, plus the duplicating shortcut (image_only: as
    in ResidualDownBlock, every frame is treated as a stream's first)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool,
                 image_only: bool = False):
        super().__init__()
        self.image_only = image_only
        self.avg_shortcut = DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2) if up else None
        kt = 1 if image_only else 3
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, kt)
                                     for i in range(num_res_blocks + 1))
        mode = "upsample3d" if temporal and not image_only else "upsample2d"
        self.upsampler = Resample(out_dim, mode, upsample_out_dim=out_dim) if up else None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        shortcut = None
        if self.image_only and self.avg_shortcut is not None:
            shortcut = _each_frame_as_first(lambda v: self.avg_shortcut(v, first_chunk=True), x)
        elif self.avg_shortcut is not None:
            shortcut = self.avg_shortcut(x, first_chunk=cache.first_call(self))
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is not None:
            x = self.upsampler(x, cache)
        return x if shortcut is None else x + shortcut
