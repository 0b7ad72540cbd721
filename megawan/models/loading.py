"""Building the encoders from weight files in any layout we convert (official Wan, diffusers / transformers,
megawan): the precompute job, generation and the tools all load them the same way.

    vae = load_vae("Wan2.1_VAE.pth", vae_preset("wan2.1"))                       # official .pth
    text = load_text_encoder("models_t5_umt5-xxl-enc-bf16.pth", text_preset("umt5-xxl"))
    tok = load_tokenizer("google/umt5-xxl", max_length=512)                       # folder or spiece.model

The layout is recognised from the keys: the first layout whose key table the file matches exactly.
"""

from __future__ import annotations

import os

import torch

from megawan.config import TextConfig, VAEConfig
from megawan.convert import convert_state_dict, load_state_dict_file

VAE_LAYOUTS = ("megawan", "official")  # megawan's VAE names are diffusers' AutoencoderKLWan names
TEXT_LAYOUTS = ("megawan", "official", "transformers")


def to_megawan(state_dict: dict, config, layouts: tuple, what: str, path: str = "") -> tuple:
    """(state dict in megawan names, the layout it came in). Errors list why each layout did not fit."""
    errors = []
    for layout in layouts:
        try:
            return convert_state_dict(state_dict, layout, "megawan", config), layout
        except (ValueError, KeyError) as e:
            errors.append(f"  as {layout}: {str(e).splitlines()[0][:300]}")
    raise ValueError(f"{path or 'state dict'} is not a {what} for config {config.name!r} in any known layout:\n"
                     + "\n".join(errors))


def load_vae(path: str, config: VAEConfig, device="cpu", dtype: torch.dtype | None = None):
    from megawan.models.vae import WanVAE

    state, _ = to_megawan(load_state_dict_file(path), config, VAE_LAYOUTS, "Wan-VAE", path)
    vae = WanVAE(config)
    vae.load_state_dict(state)
    if dtype is not None:
        vae.to(dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(path: str, config: TextConfig, device="cpu", dtype: torch.dtype | None = None, tp_group=None):
    """The umT5 encoder (tensor-parallel over `tp_group` when given: each rank keeps its shard)."""
    from megawan.models.text import UMT5Encoder

    state, _ = to_megawan(load_state_dict_file(path), config, TEXT_LAYOUTS, "umT5 encoder", path)
    encoder = UMT5Encoder(config, tp_group=tp_group)
    size = encoder.tp_group.size()
    if size > 1:
        state = convert_state_dict(state, "megawan", "megawan", config, tp_size=size)[encoder.tp_group.rank()]
    encoder.load_state_dict(state)
    if dtype is not None:
        encoder.to(dtype)
    return encoder.to(device).eval().requires_grad_(False)


def load_tokenizer(path: str, max_length: int = 512):
    """A sentencepiece model file, or a folder holding spiece.model (google/umt5-xxl as Wan ships it)."""
    from megawan.models.text import UMT5Tokenizer

    if os.path.isdir(path):
        for name in ("spiece.model", "tokenizer.model", "spm.model"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path} holds no sentencepiece model (spiece.model)")
    return UMT5Tokenizer(path, max_length=max_length)
