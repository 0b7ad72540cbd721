"""Tiny Wan pipelines in the official layout, for the conversion and generation tests: random DiT weights
(diffusers' WanTransformer3DModel, every tensor perturbed) renamed to Wan's names and cut into several
safetensors shards with an index, a config.json as Wan-Video ships it, and the tiny encoders (for Wan2.1 I2V /
FLF2V also the tiny CLIP image encoder: `make_official_i2v_pipeline`, `write_tiny_clip`)."""

from __future__ import annotations

import json
import os

import torch

from megawan.config import dit_preset, official_config_json
from megawan.convert import convert_state_dict
from megawan.demo.tiny_assets import write_tiny_encoders
from megawan.export import write_safetensors_shards
from wan_reference import diffusers_dit

TINY_T2V = dict(in_dim=4, out_dim=4, text_dim=32, text_len=24)  # fits the tiny-2.1 VAE and the tiny umT5


def make_official_pipeline(folder, preset: str = "tiny", overrides: dict | None = None, vae: str = "tiny-2.1",
                           dtype=torch.bfloat16, shard_bytes: int = 20_000, seed: int = 0):
    """Write an official-layout pipeline to `folder`; A14B presets get high_noise_model/ + low_noise_model/.
    Returns the DiT config."""
    cfg = dit_preset(preset, **(TINY_T2V if overrides is None else overrides))
    write_tiny_encoders(str(folder), vae_config=vae)
    experts = ["high_noise_model", "low_noise_model"] if cfg.expert_boundary is not None else [""]
    for i, sub in enumerate(experts):
        state = convert_state_dict(diffusers_dit(cfg, seed=seed + i).state_dict(), "diffusers", "official", cfg)
        target = os.path.join(str(folder), sub) if sub else str(folder)
        write_safetensors_shards(((k, v.to(dtype)) for k, v in state.items()), target, max_shard_bytes=shard_bytes)
        with open(os.path.join(target, "config.json"), "w", encoding="utf-8") as f:
            json.dump(official_config_json(cfg), f)
    return cfg


# Wan2.1 I2V on the tiny encoders: noise (4) + mask (4) + first-frame latents (4) in, the tiny CLIP's width (20)
TINY_I2V = dict(TINY_T2V, in_dim=12, image_dim=20)


def write_tiny_clip(folder, seed: int = 0, hidden_act: str = "gelu") -> str:
    """Wan's models_clip_*.pth for the tiny CLIP preset: a random transformers CLIPVisionModel (every tensor
    perturbed) in the official open-clip names, plus the text tower / logit scale / head keys the real file also
    holds (Wan reads none of them). Returns the file's path."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from megawan.config import clip_preset, transformers_clip_config_json

    cfg = clip_preset("tiny", hidden_act=hidden_act)
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in transformers_clip_config_json(cfg).items()
                                                if k not in ("architectures", "model_type", "torch_dtype")}))
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    official = convert_state_dict(state, "transformers", "official", cfg)
    official.update({"log_scale": torch.tensor(2.66), "textual.token_embedding.weight": torch.randn(12, 8),
                     "visual.head": torch.randn(cfg.hidden_size, cfg.projection_dim)})
    path = os.path.join(str(folder), "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    os.makedirs(str(folder), exist_ok=True)
    torch.save(official, path)
    return path


def make_official_i2v_pipeline(folder, dtype=torch.bfloat16, seed: int = 0, **kwargs):
    """A tiny Wan2.1-I2V pipeline in the official layout: make_official_pipeline("tiny-i2v") + the tiny CLIP
    (its tensors stay fp32, as they travel: conversion never casts). Returns the DiT config."""
    cfg = make_official_pipeline(folder, "tiny-i2v", TINY_I2V, dtype=dtype, seed=seed, **kwargs)
    write_tiny_clip(folder, seed=seed)
    return cfg


def make_pipelines_in_three_layouts(root) -> None:
    """A tiny official T2V pipeline in `root`/official, converted to `root`/megawan and `root`/diffusers."""
    from megawan.export import convert_pipeline

    make_official_pipeline(root / "official", dtype=torch.float32)
    convert_pipeline(str(root / "official"), "official", str(root / "megawan"), "megawan")
    convert_pipeline(str(root / "official"), "official", str(root / "diffusers"), "diffusers")
