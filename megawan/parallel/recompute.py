"""Activation recomputation, applied to a built model from outside (the model file knows nothing of it).

- full: every `every`-th block keeps only its input; its activations are recomputed in the backward.
- selective: only the core attention of every block is recomputed (its scores are the largest
  activation, and the cheapest to redo relative to their size).

Parameter names are unchanged (the forward of a module is wrapped in place), so checkpoints and
conversion do not notice.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE_MODES = ("none", "full", "selective")


def _recompute_forward(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = recomputed


def apply_activation_recompute(model: nn.Module, mode: str = "full", every: int = 1) -> nn.Module:
    """Wrap the blocks (full) or their core attentions (selective) of a WanDiT / WanDiTExperts."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")
    if every < 1:
        raise ValueError(f"recompute every must be >= 1, got {every}")
    if mode == "none":
        return model
    dits = [model.high_noise, model.low_noise] if hasattr(model, "high_noise") else [model]
    for dit in dits:
        for i, block in enumerate(dit.blocks):
            if mode == "full" and i % every == 0:
                _recompute_forward(block)
            elif mode == "selective":
                _recompute_forward(block.self_attention.core_attention)
                _recompute_forward(block.cross_attention.core_attention)
    return model
