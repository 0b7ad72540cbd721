"""The Wan-VAE (Wan2.1: z=16, 4x8x8; Wan2.2: z=48, 4x16x16 with patchify and residual blocks).

    vae = WanVAE(vae_preset("wan2.1"))
    mean, logvar = vae.encode(video)     # video [B, 3, 1 + 4k, H, W] in [-1, 1] -> raw latents [B, z, 1 + k, H/8, W/8]
    video = vae.decode(mean)             # -> [B, 3, 1 + 4k, H, W], clamped to [-1, 1]
    z = vae.normalize(mean)              # the official per-channel (z - mean) / std, what the DiT sees

Encoding runs causally over the first frame, then chunks of 4 frames; decoding over one latent frame at
a time; a StreamCache carries the causal context between chunks, so memory holds one chunk's activations
whatever the video length. `chunked=False` runs the whole video in one pass (same result).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megawan.config import VAEConfig
from megawan.models.vae.blocks import (
    AttentionBlock,
    MidBlock,
    Resample,
    ResidualBlock,
    ResidualDownBlock,
    ResidualUpBlock,
    RMSNorm,
    UpBlock,
    conv3x3,
)
from megawan.models.vae.causal import CausalConv3d, StreamCache
from megawan.models.state import torch_dtype



class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        kt = 1 if cfg.image_only else 3  # the image VAE: every conv 2D per frame
        self.conv_in = conv3x3(cfg.in_channels, dims[0], kt)
        self.down_blocks = nn.ModuleList()
        scale, last = 1.0, len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = bool(cfg.temperal_downsample[i]) if i != last else False
            if cfg.is_residual:
                self.down_blocks.append(ResidualDownBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, down=i != last,
                                                          image_only=cfg.image_only))
                continue
            temporal = temporal and not cfg.image_only
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, kt))
                if scale in cfg.attn_scales:
                    self.down_blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                self.down_blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
                scale /= 2.0
        self.mid_block = MidBlock(dims[-1], kt)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], 2 * cfg.z_dim, kt)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_up = tuple(cfg.temperal_downsample[::-1])
        kt = 1 if cfg.image_only else 3  # the image VAE: every conv 2D per frame
        self.conv_in = conv3x3(cfg.z_dim, dims[0], kt)
        self.mid_block = MidBlock(dims[0], kt)
        self.up_blocks = nn.ModuleList()
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            temporal = bool(temporal_up[i]) if up else False
            if cfg.is_residual:
                self.up_blocks.append(ResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, up,
                                                      image_only=cfg.image_only))
            else:
                in_dim = in_dim // 2 if i > 0 else in_dim  # Wan2.1's up-sampling halves the channels
                mode = ("upsample3d" if temporal and not cfg.image_only else "upsample2d") if up else None
                self.up_blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, kt))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], cfg.out_channels, kt)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C * p * p, T, H / p, W / p], channel order (c, pw, ph) as Wan2.2."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    b, cp, t, h, w = x.shape
    x = x.view(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


class WanVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.vae_config = config.validate()
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean).view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std).view(1, z, 1, 1, 1), persistent=False)
        self.to(torch_dtype(config.params_dtype))
        self.tiling = None  # (tile, stride) in pixels when enabled

    # ------------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor, chunked: bool = True):
        """video [B, 3, 1 + 4k, H, W] in [-1, 1] -> (mean, logvar), raw latents [B, z, 1 + k, H/s, W/s]."""
        self._check_video(video)
        x = video.to(self.quant_conv.weight.dtype)
        p = self.vae_config.patch_size or 1
        if p > 1:  # Wan2.2: pixels to channels first; tiles are cut (and blended) in this patch space
            x = patchify(x, p)
        if self.tiling is not None:
            return self._tiled(x, self._encode_tile, self.vae_config.spatial_stride // p, down=True)
        return self._encode_tile(x, chunked)

    def decode(self, z: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """raw latents [B, z, T', H', W'] -> video [B, 3, 1 + 4 (T' - 1), H' s, W' s] in [-1, 1]."""
        p = self.vae_config.patch_size or 1
        if self.tiling is not None:
            out = self._tiled(z, self._decode_tile, self.vae_config.spatial_stride // p, down=False)
        else:
            out = self._decode_tile(z, chunked)
        return (unpatchify(out, p) if p > 1 else out).clamp(-1.0, 1.0)

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
        """A draw from the posterior N(mean, exp(logvar))."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latents_std.to(z.dtype) + self.latents_mean.to(z.dtype)

    def enable_tiling(self, tile: int = 256, stride: int = 192) -> None:
        """Spatial tiling (pixels): tiles of `tile` overlapping by tile - stride, linearly blended."""
        if not 0 < stride <= tile:
            raise ValueError(f"tiling needs 0 < stride <= tile, got tile={tile} stride={stride}")
        self.tiling = (tile, stride)

    def disable_tiling(self) -> None:
        self.tiling = None

    # ------------------------------------------------------------------------------------------
    def _check_video(self, video: torch.Tensor) -> None:
        t, h, w = video.shape[2:]
        s = self.vae_config.spatial_stride
        if (t - 1) % self.vae_config.temporal_stride:
            raise ValueError(f"a video needs 1 + {self.vae_config.temporal_stride}k frames, got {t}")
        if h % s or w % s:
            raise ValueError(f"height and width must be multiples of {s}, got {h}x{w}")

    def _encode_tile(self, x: torch.Tensor, chunked: bool = True):
        """(patchified) video -> (mean, logvar), causally over the first frame, then chunks of 4."""
        cfg = self.vae_config
        cache = StreamCache()
        step = cfg.temporal_stride
        chunks = [x[:, :, :1]] + [x[:, :, i:i + step] for i in range(1, x.shape[2], step)] if chunked else [x]
        h = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def _decode_tile(self, z: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """latents -> (patchified) video, one latent frame at a time."""
        x = self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype))
        cache = StreamCache()
        chunks = x.split(1, dim=2) if chunked else [x]
        return torch.cat([self.decoder(c, cache) for c in chunks], dim=2)

    def _tiled(self, x: torch.Tensor, fn, ratio: int, down: bool):
        """Run fn over overlapping spatial tiles and blend them linearly across each overlap.

        Tile geometry is set in pixels (patchified pixels for Wan2.2); on latents it is divided by `ratio`."""
        p = self.vae_config.patch_size or 1
        tile, stride = self.tiling[0] // p, self.tiling[1] // p  # in (patchified) pixels
        in_tile, in_stride = (tile, stride) if down else (tile // ratio, stride // ratio)
        out_tile, out_stride = (tile // ratio, stride // ratio) if down else (tile, stride)
        blend = out_tile - out_stride
        h, w = x.shape[-2:]
        rows = []
        for i in range(0, h, in_stride):
            row = []
            for j in range(0, w, in_stride):
                part = fn(x[..., i:i + in_tile, j:j + in_tile])
                row.append(part)
            rows.append(row)

        def blend_tiles(rows_of_parts):
            # each tile is cross-faded with its (already blended) upper and left neighbours, as diffusers does
            rows_of_parts = [list(row) for row in rows_of_parts]
            result_rows = []
            for i, row in enumerate(rows_of_parts):
                result = []
                for j, part in enumerate(row):
                    if i > 0:
                        part = _blend(rows_of_parts[i - 1][j], part, blend, dim=-2)
                    if j > 0:
                        part = _blend(row[j - 1], part, blend, dim=-1)
                    row[j] = part
                    result.append(part[..., :out_stride, :out_stride])
                result_rows.append(torch.cat(result, dim=-1))
            out_h = h // ratio if down else h * ratio
            out_w = w // ratio if down else w * ratio
            return torch.cat(result_rows, dim=-2)[..., :out_h, :out_w]

        if down:  # (mean, logvar) pairs
            means = blend_tiles([[p[0] for p in row] for row in rows])
            logvars = blend_tiles([[p[1] for p in row] for row in rows])
            return means, logvars
        return blend_tiles(rows)


def _blend(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Linear cross-fade of `current`'s first `extent` rows (dim -2) or columns (-1) with `previous`'s last."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent <= 0:
        return current
    weight = torch.arange(extent, dtype=current.dtype, device=current.device) / extent
    shape = [1] * current.dim()
    shape[dim] = extent
    weight = weight.view(shape)
    head = previous.narrow(dim, previous.shape[dim] - extent, extent) * (1 - weight) + current.narrow(dim, 0, extent) * weight
    return torch.cat([head, current.narrow(dim, extent, current.shape[dim] - extent)], dim=dim)
