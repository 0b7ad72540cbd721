"""State-dict helpers shared by the megatron-core based models."""

from __future__ import annotations

import torch.nn as nn


def with_extra_state(module: nn.Module, state_dict) -> dict:
    """A tensors-only state dict (what `convert_state_dict` makes), completed with the `_extra_state` entries
    of megatron / Transformer Engine layers (FP8 metadata; None for local layers) as the module has them."""
    state_dict = dict(state_dict)
    for key, value in nn.Module.state_dict(module, keep_vars=True).items():
        if key.endswith("_extra_state") and key not in state_dict:
            state_dict[key] = value
    return state_dict
