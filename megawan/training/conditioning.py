"""Image-to-video training inputs: what an i2v model (Wan2.1 I2V / FLF2V, Wan2.2 I2V-A14B) takes beside the
noisy latents, from an image-conditioned latent store (tools/precompute_latents.py --conditioning).

    check_store(cfg, meta)                                   # preflight: the store's conditioning fits the model
    condition, image = image_inputs(batch, cfg.model, n, mean, std)
    x_in = torch.cat([x_t, condition], dim=1)                # [n, z + 4 + z, T', H', W']: Wan's x ++ y
    model(x_in, timestep, text, image=image_for_model(image, slice(None), cfg.model))  # A14B: None

As the official pipelines at sampling time and DiffSynth-Studio's Wan training: the model's input is the noisy
latents, the 4-channel frame mask and the conditioning latents (VAE latents of [first frame, zeros...],
normalised with the latents' statistics) along the channels; the flow-matching target and the loss stay on
the z noise channels over every frame. Every pipeline stage receives the same micro-batch: the first embeds
the channels (its patch embedding), and every stage embeds the CLIP tokens itself (the image embedding is
pipeline-shared like the text embedding, and every block's cross-attention reads it).
"""

from __future__ import annotations

import torch

from megawan.config import ConfigError, DiTConfig, RunConfig
from megawan.data.conditioning import expand_mask
from megawan.data.store_metadata import StoreMetadata

HOW = "tools/precompute_latents.py --conditioning {kind} makes one"


def input_channels(meta: StoreMetadata) -> int:
    """The input channels an i2v model takes on this store: noise z + mask + conditioning latents z."""
    return 2 * meta.vae.z_dim + meta.conditioning.mask_channels


def check_store(cfg: RunConfig, meta: StoreMetadata, where: str = "data.store") -> None:
    """Refuse, in one line naming the field (`where`: data.store or validation.store), an image-conditioned model
    on a store that does not fit it."""
    model = cfg.model
    if model.model_type != "i2v":
        return
    kind = "flf2v" if model.image_pos_len else "i2v"
    cond = meta.conditioning
    if cond is None:
        raise ConfigError(f"{where}: {model.name} is an image-to-video model and the store holds no image "
                          f"conditioning (first-frame latents, mask); {HOW.format(kind=kind)}")
    if model.in_dim != input_channels(meta):
        raise ConfigError(f"model.in_dim: {model.in_dim} input channels, but an i2v model on this store takes "
                          f"z_dim {meta.vae.z_dim} + mask {cond.mask_channels} + z_dim {meta.vae.z_dim} = "
                          f"{input_channels(meta)}")
    if cond.kind != kind:
        wanted = "FLF2V (model.image_pos_len is set)" if kind == "flf2v" else "I2V (model.image_pos_len unset)"
        raise ConfigError(f"{where}: the store's conditioning is {cond.kind!r} and the model is {wanted}; "
                          f"{HOW.format(kind=kind)}")
    if model.image_dim is not None:
        if cond.clip_width is None:
            raise ConfigError(f"model.image_dim: {model.image_dim}: the model takes CLIP image tokens and the store "
                              "holds none; precompute it with a CLIP image encoder (--clip)")
        if cond.clip_width != model.image_dim:
            raise ConfigError(f"model.image_dim: {model.image_dim}, but the store's CLIP tokens have width "
                              f"{cond.clip_width} ({cond.clip})")
        if model.image_pos_len and cond.clip_tokens != model.image_pos_len:
            raise ConfigError(f"model.image_pos_len: {model.image_pos_len} image tokens, but the store holds "
                              f"{cond.clip_tokens} per sample")


def image_inputs(batch: dict, model: DiTConfig, n: int, mean: torch.Tensor, std: torch.Tensor) -> tuple:
    """(condition float32 [n, mask + z, T', H', W'] or None, CLIP tokens [n, tokens, width] or None) for the
    batch's samples, padded to n with copies of the first (the trainer pads the latents the same way). None, None
    for a model that is not i2v; tokens None for one without an image branch (A14B)."""
    if model.model_type != "i2v":
        return None, None
    latents = _pad(batch["cond_latents"], n).float()
    mask = expand_mask(_pad(batch["cond_mask"], n), *latents.shape[-2:])
    condition = torch.cat([mask, (latents - mean) / std], dim=1)
    image = _pad(batch["clip_tokens"], n) if model.image_dim is not None else None
    return condition, image


def image_for_model(tokens, sl: slice, model: DiTConfig, device=None, dtype=None):
    """Micro-batch `sl` of the CLIP tokens [n, tokens, width] as the DiT's `image=` takes them, on device in
    dtype: FLF2V's image embedding reads [2b, tokens / 2, width], each sample's first-frame tokens then its
    last-frame tokens (the official `clip_fea` of two images), and adds its learned positions to the pair.
    None (no CLIP tokens) stays None."""
    if tokens is None:
        return None
    tokens = tokens[sl]
    if model.image_pos_len:
        tokens = tokens.reshape(2 * tokens.shape[0], tokens.shape[1] // 2, tokens.shape[2])
    return tokens.to(device, dtype)


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, x[:1].expand(n - x.shape[0], *x.shape[1:])]) if n > x.shape[0] else x


__all__ = ["check_store", "image_inputs", "image_for_model", "input_channels"]
