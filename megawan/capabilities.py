"""The one capability check behind every GPU-only path (Transformer Engine, FP8, DALI mixed, NCCL, pinned memory).

megawan asks this module, never `torch.cuda.is_available()` itself, so a CPU machine and a GPU machine differ in
exactly one place (`kernels/`, which sits below megawan and imports none of it, makes its own Triton check).
Which GPU a rank uses is chosen once, by `megawan.parallel.initialize` (LOCAL_RANK); `rank_device()` reports it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    return torch.cuda.is_available()


def rank_device() -> torch.device:
    """This rank's device: the CUDA device `megawan.parallel.initialize` set for it, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def resolve_device(device=None) -> torch.device:
    """A device argument made concrete: None or "auto" -> `rank_device()`; "cuda" -> this rank's CUDA device (the
    current one, where megatron creates tensor-parallel weights); "cpu", "cuda:N" or a torch.device as given."""
    if device is None or device == "auto":
        return rank_device()
    device = torch.device(device)
    if device.type == "cuda":
        if not cuda_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device here (use cpu)")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """Transformer Engine's PyTorch part (2.9 or newer, what megatron-core 0.16.1 declares) is importable and a
    CUDA device is there to run it."""
    if not cuda_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch as te
    except Exception:  # a TE built against another torch fails at import
        return False
    return hasattr(te, "autocast")  # TE 2.9's context manager, which megawan.training.precision enters


def resolve_backend(backend: str) -> str:
    """`auto` -> `te` when Transformer Engine and CUDA are usable, else `local`; `te` without them is an error."""
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    if backend == "te" and not transformer_engine_available():
        raise RuntimeError(
            "model.backend=te needs Transformer Engine (>= 2.9) and a CUDA device; "
            "use model.backend=local (pure torch) or auto on this machine"
        )
    if backend not in ("local", "te"):
        raise ValueError(f"unknown backend {backend!r} (local | te | auto)")
    return backend
