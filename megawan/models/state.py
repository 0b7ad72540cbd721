"""Helpers shared by the models: parameter dtypes from config names, tensors-only state dicts."""

from __future__ import annotations

import torch
import torch.nn as nn

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's `params_dtype` name."""
    return _TORCH_DTYPES[name]


def with_extra_state(module: nn.Module, state_dict) -> dict:
    """A tensors-only state dict (what `convert_state_dict` makes), completed with the `_extra_state` entries
    of megatron / Transformer Engine layers (FP8 metadata; None for local layers) as the module has them."""
    state_dict = dict(state_dict)
    for key, value in nn.Module.state_dict(module, keep_vars=True).items():
        if key.endswith("_extra_state") and key not in state_dict:
            state_dict[key] = value
    return state_dict
