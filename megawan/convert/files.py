"""Reading checkpoint files without unpickling arbitrary objects: safetensors, or torch.load with
weights_only=True (tensors and plain containers only)."""

from __future__ import annotations

import os

import torch


def load_state_dict_file(path: str, device: str = "cpu", mmap: bool = False) -> dict:
    """A state dict from .safetensors / .pth / .pt / .bin; refuses pickled objects other than tensors.
    mmap=True maps a .pth instead of reading it (cheap when only names and shapes are wanted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=device)
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        state = torch.load(path, map_location=device, weights_only=True)  # a legacy (non-zip) file: read it
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return state
