"""Model FLOPs of the Wan DiT forward pass: every matmul (2 m n k) and both attention products.

Training is counted as 3x forward (backward = 2x forward), the usual model-FLOPs convention; elementwise
work, norms and RoPE are not counted. Sizes are the DiT's input, i.e. LATENT frames / height / width;
`latent_size` turns a video's frames / pixels into them (the VAE's strides: `megawan flops`, plan_parallel.py).
"""

from __future__ import annotations

from typing import Optional

from megawan.config import ConfigError, DiTConfig


def flops(config: DiTConfig, batch: int, frames: int, height: int, width: int,
          text_len: Optional[int] = None, image_len: int = 257, per_token_timestep: bool = False) -> int:
    """Forward FLOPs for `batch` samples of latents [C, frames, height, width].

    text_len defaults to config.text_len (Wan pads text to it); image_len counts CLIP tokens for models with
    an image branch; per_token_timestep (Wan2.2 TI2V) embeds one timestep per token.
    """
    pt, ph, pw = config.patch_size
    s = (frames // pt) * (height // ph) * (width // pw)
    d, f = config.dim, config.ffn_dim
    lt = config.text_len if text_len is None else text_len
    li = image_len if config.image_dim else 0

    def mm(m, n, k):
        return 2 * m * n * k

    total = mm(s, d, config.in_dim * config.patch_volume)  # patch embedding
    total += mm(lt, d, config.text_dim) + mm(lt, d, d)  # text embedding
    n_t = s if per_token_timestep else 1
    total += n_t * (mm(1, d, config.freq_dim) + mm(1, d, d) + mm(1, 6 * d, d))  # time embedding + projection
    if li:
        total += mm(li, config.image_dim, config.image_dim) + mm(li, d, config.image_dim)

    block = 4 * mm(s, d, d) + 2 * mm(s, s, d)  # self-attention: q k v o, q k^T and p v
    block += 2 * mm(s, d, d) + 2 * mm(lt, d, d) + 2 * mm(s, lt, d)  # cross-attention to text
    if li:
        block += 2 * mm(li, d, d) + 2 * mm(s, li, d)  # image keys / values and their attention
    block += 2 * mm(s, f, d)  # MLP
    total += config.num_layers * block
    total += mm(s, config.out_dim * config.patch_volume, d)  # head
    return batch * total


def tokens(config: DiTConfig, frames: int, height: int, width: int) -> int:
    """Video tokens per sample for latents of this size."""
    pt, ph, pw = config.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


def vae_strides(config: DiTConfig) -> tuple:
    """(temporal, spatial) stride of the VAE the model's latents come from: Wan2.2's 4 x 16 x 16 for the 48-channel
    latents of TI2V-5B, Wan2.1's 4 x 8 x 8 otherwise."""
    return (4, 16) if config.out_dim == 48 else (4, 8)


def latent_size(config: DiTConfig, frames: int, height: int, width: int) -> tuple:
    """(latent frames, height, width) of a video of `frames` frames, `height` x `width` pixels; a size the VAE and
    the patch size cannot take is a ConfigError naming --frames / --height / --width."""
    t, s = vae_strides(config)
    multiple = s * config.patch_size[1]
    if frames < 1 or (frames - 1) % t:
        raise ConfigError(f"--frames: {frames} video frames do not fit Wan's causal VAE (1 + {t}k: 1, 5, ..., 81)")
    for name, n in (("--height", height), ("--width", width)):
        if n < 1 or n % multiple:
            raise ConfigError(f"{name}: {n} pixels is not a multiple of {multiple} (VAE stride {s} x patch "
                              f"{config.patch_size[1]}) for {config.name}")
    return 1 + (frames - 1) // t, height // s, width // s
