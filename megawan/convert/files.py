"""Reading weight files without unpickling arbitrary objects: safetensors, or torch.load with
weights_only=True (tensors and plain containers only).

    sd = load_state_dict_file("Wan2.1_VAE.pth")               # one file, whole
    sd = load_safetensors_folder("pipeline/vae")               # every *.safetensors of a folder, whole
    dit = SafetensorsDir("Wan2.1-T2V-14B"); dit.get(key)       # sharded files, one tensor at a time
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def load_state_dict_file(path: str, device: str = "cpu", mmap: bool = False) -> dict:
    """A state dict from .safetensors / .pth / .pt / .bin; refuses pickled objects other than tensors.
    mmap=True maps a .pth instead of reading it (cheap when only names and shapes are wanted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
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


def load_safetensors_folder(folder: str) -> dict:
    """Every tensor of every *.safetensors file in `folder` (e.g. a diffusers pipeline's vae/ or text_encoder/)."""
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


class SafetensorsDir:
    """The tensors of a folder of (sharded) safetensors files, read one at a time."""

    def __init__(self, folder: str, stem: str = "diffusion_pytorch_model"):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and f.startswith(stem))
        if not files:
            raise FileNotFoundError(f"{folder} holds no {stem}*.safetensors")
        self._where, self._handles = {}, []
        for name in files:
            handle = safe_open(os.path.join(folder, name), framework="pt")
            self._handles.append(handle)
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"{key!r} appears in two shards of {folder}")
                self._where[key] = handle

    def keys(self) -> list:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)
