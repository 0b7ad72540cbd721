"""The Wan-VAE's config: `VAEConfig`, its presets with the official latent statistics, and the reader of
diffusers' AutoencoderKLWan config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megawan.config.fields import DTYPES, ConfigError, build, checker, from_preset
from megawan.config.wan22_stats import WAN22_LATENT_MEAN, WAN22_LATENT_STD

WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class VAEConfig:
    """Hyper-parameters of a Wan-VAE (names as diffusers' AutoencoderKLWan config)."""

    name: str = "custom"
    base_dim: int = 96
    decoder_base_dim: Optional[int] = None  # Wan2.2: a wider decoder (256)
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)  # (sic) diffusers' spelling
    is_residual: bool = False  # Wan2.2: residual down / up blocks with parameter-free shortcuts
    in_channels: int = 3  # after patchify: 3 * patch_size ** 2
    out_channels: int = 3
    patch_size: Optional[int] = None  # Wan2.2: 2 (pixels -> channels before the encoder)
    latents_mean: tuple = WAN21_LATENT_MEAN
    latents_std: tuple = WAN21_LATENT_STD
    params_dtype: str = "float32"
    # The Wan report's stage-1 2D image VAE of the same structure: every causal conv has time kernel 1 (a 2D conv
    # per frame), no temporal down / up-sampling (no time_conv; temperal_downsample only tells Wan2.2's
    # parameter-free shortcuts what their 3D twin does to a stream's first frame, which they do to every frame).
    # megawan.models.vae.inflate turns its weights into the 3D VAE's; it has no official / diffusers layout.
    image_only: bool = False

    @property
    def temporal_stride(self) -> int:
        if self.image_only:
            return 1
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    def validate(self, prefix: str = "vae") -> "VAEConfig":
        need = checker(prefix)

        need(len(self.latents_mean) == self.z_dim, "latents_mean", f"has {len(self.latents_mean)} values for z_dim={self.z_dim}")
        need(len(self.latents_std) == self.z_dim, "latents_std", f"has {len(self.latents_std)} values for z_dim={self.z_dim}")
        need(len(self.temperal_downsample) == len(self.dim_mult) - 1, "temperal_downsample",
             f"needs one entry per down-sampling ({len(self.dim_mult) - 1})")
        need(self.params_dtype in DTYPES, "params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        need(isinstance(self.image_only, bool), "image_only", f"must be true or false, got {self.image_only!r}")
        return self


def _tiny_stats(n: int):
    return tuple(round(0.1 * ((i * 7) % 5 - 2), 2) for i in range(n)), tuple(round(1.0 + 0.25 * (i % 4), 2) for i in range(n))


_VAE_PRESETS = {
    "wan2.1": dict(),
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, latents_mean=WAN22_LATENT_MEAN, latents_std=WAN22_LATENT_STD),
    "tiny-2.1": dict(base_dim=8, z_dim=4, latents_mean=_tiny_stats(4)[0], latents_std=_tiny_stats(4)[1]),
    "tiny-2.2": dict(base_dim=8, decoder_base_dim=12, z_dim=6, is_residual=True, in_channels=12, out_channels=12,
                     patch_size=2, latents_mean=_tiny_stats(6)[0], latents_std=_tiny_stats(6)[1]),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """`vae_preset("wan2.1" | "wan2.2" | "tiny-2.1" | "tiny-2.2")`."""
    return from_preset(VAEConfig, _VAE_PRESETS, name, "VAE", "vae", overrides)


def vae_config_from(config_json: dict, **overrides) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKLWan config.json dict."""
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config_json.items() if k in known}
    values["name"] = "diffusers"
    values.update(overrides)
    return build(VAEConfig, values, "vae").validate()


def diffusers_vae_config_json(c: "VAEConfig") -> dict:
    """The diffusers AutoencoderKLWan config.json of `c` (what vae_config_from reads back)."""
    if c.image_only:
        raise ConfigError("vae.image_only: an image-only VAE has no diffusers / official layout; inflate it into "
                          "the 3D VAE first (init.inflate: true, megawan.models.vae.inflate)")
    return {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0", "base_dim": c.base_dim,
            "decoder_base_dim": c.decoder_base_dim, "z_dim": c.z_dim, "dim_mult": list(c.dim_mult),
            "num_res_blocks": c.num_res_blocks, "attn_scales": list(c.attn_scales),
            "temperal_downsample": list(c.temperal_downsample), "dropout": 0.0, "is_residual": c.is_residual,
            "in_channels": c.in_channels, "out_channels": c.out_channels, "patch_size": c.patch_size,
            "scale_factor_spatial": c.spatial_stride, "scale_factor_temporal": c.temporal_stride,
            "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std)}
