"""Helpers shared by the models: the device they are built on, parameter dtypes from config names, tensors-only
state dicts."""

from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megawan.capabilities import resolve_device

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's `params_dtype` name."""
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype (the inverse of `torch_dtype`)."""
    return next(name for name, d in _TORCH_DTYPES.items() if d == dtype)


def with_extra_state(module: nn.Module, state_dict) -> dict:
    """A tensors-only state dict (what `convert_state_dict` makes), completed with the `_extra_state` entries
    of megatron / Transformer Engine layers (FP8 metadata; None for local layers) as the module has them."""
    state_dict = dict(state_dict)
    for key, value in nn.Module.state_dict(module, keep_vars=True).items():
        if key.endswith("_extra_state") and key not in state_dict:
            state_dict[key] = value
    return state_dict


def model_device(device) -> torch.device:
    """Where a model is built: a CUDA device must be the current one (megatron creates its tensor-parallel weights
    there), and megatron's CUDA RNG tracker, which `megawan.parallel.initialize` seeds, must be set up."""
    device = resolve_device(device)
    if device.type == "cuda":
        if device.index != torch.cuda.current_device():
            raise ValueError(f"a model on {device} must be built while it is the current CUDA device "
                             f"(torch.cuda.set_device; it is cuda:{torch.cuda.current_device()})")
        if not get_cuda_rng_tracker().is_initialized():
            raise RuntimeError("building a model on the GPU needs megatron's CUDA RNG tracker: call "
                               "megawan.parallel.initialize() first")
    return device
