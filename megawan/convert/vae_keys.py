"""Wan-VAE state-dict names: ours are diffusers' AutoencoderKLWan names; the official Wan2.1_VAE.pth and
Wan2.2_VAE.pth names follow from them by the rules below (the module tree is walked once on the meta device, so the table
covers exactly the parameters a model of this config has)."""

from __future__ import annotations

import re

import torch

from megawan.config import VAEConfig

# Residual-block internals: official `residual` is Sequential(RMS_norm, SiLU, Conv, RMS_norm, SiLU, Dropout, Conv)
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_RESNET = re.compile(r"^(?P<path>.*?(?:resnets\.\d+|down_blocks\.\d+))\.(?P<part>norm1|conv1|norm2|conv2|conv_shortcut)\.(?P<param>\w+)$")


def _official_common(name: str) -> str:
    """What both versions share: residual-block internals, middle, heads, input convs, quant convs."""
    m = _RESNET.match(name)
    if m:
        name = f"{m['path']}.{_RESIDUAL[m['part']]}.{m['param']}"
    rules = [
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    ]
    return _apply(rules, name)


def _apply(rules: list, name: str) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def _official_21(name: str, cfg: VAEConfig) -> str:
    """Wan2.1_VAE.pth: encoder and decoder levels are flat Sequentials."""
    name = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", _official_common(name))
    # decoder: per level R+1 residual blocks, then the resample, all in one flat list
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", name)
    if m:
        index = int(m[1]) * (cfg.num_res_blocks + 2) + (int(m[3]) if m[3] is not None else cfg.num_res_blocks + 1)
        name = f"decoder.upsamples.{index}.{m[4]}"
    return name


def _official_22(name: str, cfg: VAEConfig) -> str:
    """Wan2.2_VAE.pth: each level is a block whose inner Sequential holds the residual blocks, then the resample."""
    name = _official_common(name)
    r = cfg.num_res_blocks
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{r}."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
        (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{r + 1}."),
    ]
    return _apply(rules, name)


def vae_key_table(config: VAEConfig) -> list:
    """[(megawan_key, official_key, diffusers_key)] for every parameter of a VAE with this config."""
    official = _official_22 if config.is_residual else _official_21
    return [(name, official(name, config), name) for name in vae_param_shapes(config)]


def vae_param_shapes(config: VAEConfig) -> dict:
    from megawan.models.vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}
