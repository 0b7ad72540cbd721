"""Tiny Wan pipelines in the official layout, for the conversion and generation tests: random DiT weights
(diffusers' WanTransformer3DModel, every tensor perturbed) renamed to Wan's names and cut into several
safetensors shards with an index, a config.json as Wan-Video ships it, and the tiny encoders."""

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
