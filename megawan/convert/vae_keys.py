"""Wan-VAE state-dict names: ours are diffusers' AutoencoderKLWan names; the official Wan2.1_VAE.pth and
Wan2.2_VAE.pth names follow from them by the rules below. The parameter names and shapes are worked out from the
config (`vae_param_shapes`), so the table covers exactly the parameters a model of this config has."""

from __future__ import annotations

import re

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
    """{megawan name: shape} for every parameter of a WanVAE with this config, in the model's parameter order.
    Worked out from the config as megawan.models.vae builds its modules (tests check it against the model), so
    that this module needs no model code."""
    shapes = {}

    def conv(name, out_dim, in_dim, kernel):  # CausalConv3d (3 kernel dims) or nn.Conv2d (2)
        shapes[f"{name}.weight"] = (out_dim, in_dim, *kernel)
        shapes[f"{name}.bias"] = (out_dim,)

    def norm(name, dim, images=False):  # RMSNorm
        shapes[f"{name}.gamma"] = (dim, 1, 1) if images else (dim, 1, 1, 1)

    def residual(name, in_dim, out_dim):  # ResidualBlock
        norm(f"{name}.norm1", in_dim)
        conv(f"{name}.conv1", out_dim, in_dim, (3, 3, 3))
        norm(f"{name}.norm2", out_dim)
        conv(f"{name}.conv2", out_dim, out_dim, (3, 3, 3))
        if in_dim != out_dim:
            conv(f"{name}.conv_shortcut", out_dim, in_dim, (1, 1, 1))

    def attention(name, dim):  # AttentionBlock
        norm(f"{name}.norm", dim, images=True)
        conv(f"{name}.to_qkv", 3 * dim, dim, (1, 1))
        conv(f"{name}.proj", dim, dim, (1, 1))

    def mid(name, dim):  # MidBlock
        residual(f"{name}.resnets.0", dim, dim)
        residual(f"{name}.resnets.1", dim, dim)
        attention(f"{name}.attentions.0", dim)

    def resample(name, dim, mode, upsample_out_dim=None):  # Resample
        if mode.startswith("upsample"):
            conv(f"{name}.resample.1", upsample_out_dim or dim // 2, dim, (3, 3))
        else:
            conv(f"{name}.resample.1", dim, dim, (3, 3))
        if mode == "upsample3d":
            conv(f"{name}.time_conv", 2 * dim, dim, (3, 1, 1))
        elif mode == "downsample3d":
            conv(f"{name}.time_conv", dim, dim, (3, 1, 1))

    c, r, z = config, config.num_res_blocks, config.z_dim
    last = len(c.dim_mult) - 1
    # Encoder3d
    dims = [c.base_dim * m for m in (1, *c.dim_mult)]
    conv("encoder.conv_in", dims[0], c.in_channels, (3, 3, 3))
    scale, index = 1.0, 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        temporal = bool(c.temperal_downsample[i]) if i != last else False
        mode = "downsample3d" if temporal else "downsample2d"
        if c.is_residual:  # ResidualDownBlock
            for k in range(r):
                residual(f"encoder.down_blocks.{i}.resnets.{k}", in_dim if k == 0 else out_dim, out_dim)
            if i != last:
                resample(f"encoder.down_blocks.{i}.downsampler", out_dim, mode)
            continue
        for _ in range(r):
            residual(f"encoder.down_blocks.{index}", in_dim, out_dim)
            index += 1
            if scale in c.attn_scales:
                attention(f"encoder.down_blocks.{index}", out_dim)
                index += 1
            in_dim = out_dim
        if i != last:
            resample(f"encoder.down_blocks.{index}", out_dim, mode)
            index += 1
            scale /= 2.0
    mid("encoder.mid_block", dims[-1])
    norm("encoder.norm_out", dims[-1])
    conv("encoder.conv_out", 2 * z, dims[-1], (3, 3, 3))
    # WanVAE
    conv("quant_conv", 2 * z, 2 * z, (1, 1, 1))
    conv("post_quant_conv", z, z, (1, 1, 1))
    # Decoder3d
    base = c.decoder_base_dim or c.base_dim
    dims = [base * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
    temporal_up = tuple(c.temperal_downsample[::-1])
    conv("decoder.conv_in", dims[0], z, (3, 3, 3))
    mid("decoder.mid_block", dims[0])
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        up = i != last
        temporal = bool(temporal_up[i]) if up else False
        mode = "upsample3d" if temporal else "upsample2d"
        name = f"decoder.up_blocks.{i}"
        if not c.is_residual:  # UpBlock: Wan2.1's up-sampling halves the channels
            in_dim = in_dim // 2 if i > 0 else in_dim
        for k in range(r + 1):
            residual(f"{name}.resnets.{k}", in_dim if k == 0 else out_dim, out_dim)
        if up and c.is_residual:  # ResidualUpBlock
            resample(f"{name}.upsampler", out_dim, mode, upsample_out_dim=out_dim)
        elif up:
            resample(f"{name}.upsamplers.0", out_dim, mode)
    norm("decoder.norm_out", dims[-1])
    conv("decoder.conv_out", c.out_channels, dims[-1], (3, 3, 3))
    return shapes
