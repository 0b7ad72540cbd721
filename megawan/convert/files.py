"""Reading weight files without unpickling arbitrary objects: safetensors, or torch.load with
weights_only=True (tensors and plain containers only).

    sd = load_state_dict_file("Wan2.1_VAE.pth")               # one file, whole
    sd = load_safetensors_folder("pipeline/vae")               # every *.safetensors of a folder, whole
    dit = SafetensorsDir("Wan2.1-T2V-14B"); dit.get(key)       # sharded files, one tensor at a time
    noise = load_torch_file("noise.pt")                         # any torch.save'd tensors, weights_only=True

A file that cannot be read (truncated, not a weight file) or that holds code / Python objects (which
weights_only refuses to run) is a WeightFileError naming the file: one line for the user, not torch's traceback.
"""

from __future__ import annotations

import os
import pickle

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from megawan.utils.user_errors import UserError

REFUSED = ("holds code or Python objects other than tensors, which are not loaded for safety "
           "(only tensors and plain containers are)")
# what torch.load raises for a file it cannot parse: a damaged zip (RuntimeError), a truncated pickle (EOFError),
# a legacy file of garbage (KeyError / UnpicklingError)
_UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError)


class WeightFileError(UserError, ValueError):
    """A weight file that is unreadable or unsafe to load; the message names the file."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_torch_file(path: str, map_location="cpu", mmap: bool = False):
    """torch.load(path, weights_only=True), with a refused pickle or an unreadable file as WeightFileError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise WeightFileError(f"{path} {REFUSED}") from None
        raise WeightFileError(f"{path} is not a readable torch file ({_first_line(e)})") from None
    except _UNREADABLE as e:
        if mmap and isinstance(e, RuntimeError) and "mmap can only be used" in str(e):
            return load_torch_file(path, map_location)  # a legacy (non-zip) file: read it instead of mapping
        raise WeightFileError(f"{path} is not a readable torch file ({_first_line(e)})") from None


def open_safetensors(path: str):
    """safe_open(path), with a damaged file as WeightFileError naming it. The caller closes the handle (or uses
    it as a context manager)."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise WeightFileError(f"{path} is not a readable safetensors file ({e})") from None


def load_state_dict_file(path: str, device: str = "cpu", mmap: bool = False) -> dict:
    """A state dict from .safetensors / .pth / .pt / .bin; refuses pickled objects other than tensors.
    mmap=True maps a .pth instead of reading it (cheap when only names and shapes are wanted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path, device=device)
        except SafetensorError as e:
            raise WeightFileError(f"{path} is not a readable safetensors file ({e})") from None
    state = load_torch_file(path, map_location=device, mmap=mmap)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(f"{path} does not hold a flat state dict of tensors")
    return state


def load_safetensors_folder(folder: str) -> dict:
    """Every tensor of every *.safetensors file in `folder` (e.g. a diffusers pipeline's vae/ or text_encoder/)."""
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open_safetensors(os.path.join(folder, name)) as f:
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
            handle = open_safetensors(os.path.join(folder, name))
            self._handles.append(handle)
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"{key!r} appears in two shards of {folder}")
                self._where[key] = handle

    def keys(self) -> list:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)
