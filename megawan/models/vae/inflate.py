"""Inflation of the stage-1 image VAE into the 3D causal Wan-VAE (the Wan report's stage 1 -> stage 2).

    cfg2d = image_vae_config(vae_preset("wan2.1"))           # the 2D twin: VAEConfig(image_only=True)
    ...train WanVAE(cfg2d) on images...
    state3d = inflate_image_vae(vae2d.state_dict(), vae_preset("wan2.1"))
    WanVAE(vae_preset("wan2.1")).load_state_dict(state3d)      # then train on short clips

The image VAE is the 3D VAE with time kernel 1 in every causal conv and no temporal resampling. Inflation:
- a 2D conv's weight [O, I, 1, kh, kw] goes to the LAST time tap (the current frame) of the 3D conv's
  [O, I, 3, kh, kw]; the earlier taps (past frames) are zero; biases and every other tensor are copied;
- the temporal resampling convs (`time_conv`, absent in 2D) start as identities: the down-sampler keeps the
  newest frame of each stride-2 window, the up-sampler emits each frame twice.

What the inflated VAE computes before any stage-2 step (tested in tests/test_vae_inflate.py):
- a single image (and the first frame of any clip, the stream being causal): exactly the image VAE's encode
  and decode (Wan2.1 and Wan2.2);
- Wan2.1, a clip of 1 + 4k frames: latent frame j is the image VAE's encoding of frame 4j (the newest frame of
  its chunk); decoding repeats each latent frame's image over its 4 frames. A clip of identical frames is
  therefore reconstructed, every frame, exactly as the image VAE reconstructs that image;
- Wan2.2 adds parameter-free space-time shortcuts (AvgDown3D / DupUp3D) that average / spread pairs of frames
  after the first; no weight can make them per-frame, so on later frames the inflated Wan2.2 VAE departs from
  the image VAE (even for identical frames) until stage 2 adapts it. The image VAE's shortcuts treat every
  frame as the 3D VAE treats a stream's first frame, which is why images match exactly.

`per_frame_init(vae, generator)` initialises a (3D or 2D) VAE from scratch the same way: a per-frame image
autoencoder (used for the demo's tiny VAE).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from megawan.config import VAEConfig
from megawan.config.fields import ConfigError
from megawan.models.vae.blocks import AttentionBlock, Resample, ResidualBlock
from megawan.models.vae.model import WanVAE


def image_vae_config(cfg: VAEConfig) -> VAEConfig:
    """The 2D image VAE of the same structure as `cfg` (whose weights inflate_image_vae turns into cfg's)."""
    return dataclasses.replace(cfg, image_only=True).validate()


def _time_conv_identity(weight: torch.Tensor, upsample: bool) -> None:
    """A temporal resampling conv's weight [C or 2C, C, 3, 1, 1] as an identity on the newest frame (in place)."""
    c = weight.shape[1]
    weight.zero_()
    eye = torch.eye(c, dtype=weight.dtype, device=weight.device)
    weight[:c, :, -1, 0, 0] = eye
    if upsample:  # two output frames per input frame, both the input
        weight[c:, :, -1, 0, 0] = eye


def inflate_image_vae(state: dict, config: VAEConfig, where: str = "init.from") -> dict:
    """The image VAE's state dict (WanVAE names, `image_vae_config(config)`'s shapes) -> `config`'s state dict.

    A tensor that does not fit (a missing or extra key, a shape other than the time kernel's) is a ConfigError
    of one line naming `where` (the config field of the file), the key and both shapes."""
    if config.image_only:
        raise ConfigError("vae.image_only: inflation makes the 3D VAE; the target config is an image VAE itself")
    with torch.device("meta"):
        target = WanVAE(dataclasses.replace(config, params_dtype="float32")).state_dict()
    extra = sorted(set(state) - set(target))
    if extra:
        raise ConfigError(f"{where}: the image VAE's tensor {extra[0]} has no place in the 3D VAE "
                          f"(is it an image_only VAE of this vae.* config?)")
    out = {}
    for key, want in target.items():
        if key not in state:
            if key.endswith("time_conv.weight"):
                w = torch.empty(want.shape, dtype=_dtype(state))
                _time_conv_identity(w, upsample=want.shape[0] == 2 * want.shape[1])
                out[key] = w
            elif key.endswith("time_conv.bias"):
                out[key] = torch.zeros(want.shape, dtype=_dtype(state))
            else:
                raise ConfigError(f"{where}: the image VAE has no tensor {key} "
                                  f"(shape {list(want.shape)} in the 3D VAE)")
            continue
        have = state[key]
        if tuple(have.shape) == tuple(want.shape):
            out[key] = have.detach().clone()
        elif have.dim() == 5 and have.shape[2] == 1 and have.shape[:2] == want.shape[:2] \
                and have.shape[3:] == want.shape[3:]:
            w = have.new_zeros(want.shape)
            w[:, :, -1:] = have  # the current frame's tap; past frames contribute nothing at first
            out[key] = w
        else:
            raise ConfigError(f"{where}: {key} has shape {list(have.shape)}; the 3D VAE wants {list(want.shape)} "
                              f"(from an image VAE [.., 1, kh, kw])")
    return out


def _dtype(state: dict) -> torch.dtype:
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


@torch.no_grad()
def per_frame_init(vae: nn.Module, generator: torch.Generator) -> None:
    """Initialise `vae` (a WanVAE, 3D or image_only) for training from scratch as a per-frame image autoencoder.

    Every conv: weights N(0, 1 / fan_in), zero bias; causal 3D convs put those weights on their last
    (current-frame) time tap and zeros on the earlier taps (as inflation does); the second conv of every residual
    block and every attention output projection start at zero (each block starts as its shortcut); the temporal
    resampling convs start as identities. Why: PyTorch's default init's biases drown the input (the encoder
    output barely depends on the image) and its random earlier taps mix frames; a tiny model trained from there
    does not get past "background everywhere" within a few hundred steps.
    """
    for m in vae.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            w = m.weight
            if w.dim() == 5 and w.shape[2] > 1:
                w.zero_()
                w[:, :, -1].normal_(0.0, 1.0 / math.sqrt(w[0, :, -1].numel()), generator=generator)
            else:
                w.normal_(0.0, 1.0 / math.sqrt(w[0].numel()), generator=generator)
            if m.bias is not None:
                m.bias.zero_()
    for m in vae.modules():
        if isinstance(m, ResidualBlock):
            m.conv2.weight.zero_()
        elif isinstance(m, AttentionBlock):
            m.proj.weight.zero_()
        elif isinstance(m, Resample) and hasattr(m, "time_conv"):
            _time_conv_identity(m.time_conv.weight, upsample=m.mode == "upsample3d")


def freeze_earlier_time_taps(vae: nn.Module) -> list:
    """Keep the earlier time taps of `vae`'s causal 3D convs as they are (zero after inflation or per_frame_init):
    a gradient hook on each such weight zeroes all but its current-frame tap's gradient, so only the temporal
    resampling convs mix frames. Returns the hook handles. Why: in a short clip stage the earlier taps, trained
    from zero, made a tiny VAE's colours drift along a clip (docs/vae_training.md, "The demo's tiny VAE")."""
    resampling = {id(m.time_conv.weight) for m in vae.modules() if isinstance(m, Resample) and hasattr(m, "time_conv")}
    handles = []
    for m in vae.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Conv3d) and w.shape[2] > 1 and id(w) not in resampling and w.requires_grad:
            mask = torch.zeros_like(w)
            mask[:, :, -1] = 1
            handles.append(w.register_hook(lambda g, mask=mask: g * mask.to(g.dtype)))
    return handles
