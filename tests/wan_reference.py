"""Reference models nobody here wrote: diffusers' WanTransformer3DModel built from a megawan config."""

from __future__ import annotations

import torch

from megawan.config import DiTConfig


def diffusers_dit(config: DiTConfig, seed: int = 0):
    """A diffusers Wan transformer with this config and random weights (every tensor perturbed, so that
    no parameter hides behind a zero or a one), in fp32 eval mode."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=tuple(config.patch_size),
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if config.qk_norm else None,
        eps=config.eps,
        image_dim=config.image_dim,
        added_kv_proj_dim=config.dim if config.image_dim else None,
        rope_max_seq_len=config.rope_max_len,
        pos_embed_seq_len=config.image_pos_len,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def diffusers_forward(model, latents, timestep, text, image=None, text_len=None):
    """diffusers' forward with Wan's text handling: text zero-padded to text_len; for I2V, diffusers takes
    image tokens concatenated before exactly 512 text tokens."""
    if text_len is not None and text.shape[1] < text_len:
        text = torch.nn.functional.pad(text, (0, 0, 0, text_len - text.shape[1]))
    return model(latents, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]


def random_inputs(config: DiTConfig, batch=2, frames=3, height=4, width=6, text_tokens=5, per_token=False,
                  image_tokens=7, images_per_sample=1, seed=1):
    """Latents, timesteps (Wan's 0-1000 units), text states (fewer tokens than text_len) and image tokens
    (FLF2V: two images per sample, first and last frame, stacked along the batch as Wan's CLIP returns them)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_dim, frames, height, width, generator=gen)
    if per_token:
        pt, ph, pw = config.patch_size
        seq = (frames // pt) * (height // ph) * (width // pw)
        timestep = torch.rand(batch, seq, generator=gen) * 1000
        timestep[:, : (height // ph) * (width // pw)] = 0.0  # TI2V: first-frame tokens are clean (t = 0)
    else:
        timestep = torch.rand(batch, generator=gen) * 1000
    text = torch.randn(batch, text_tokens, config.text_dim, generator=gen)
    image = torch.randn(batch * images_per_sample, image_tokens, config.image_dim, generator=gen) if config.image_dim else None
    return latents, timestep, text, image


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|"""
    return ((ours - ref).abs().max() / ref.abs().max()).item()
