"""`megawan env`: what this machine gives megawan, for bug reports and for checking a new cluster image.

    megawan env
    python -c "from megawan.env_report import report; print(report())"

Versions of Python, torch and the libraries megawan can use, the GPUs, what `model.backend: auto` and
MEGAWAN_KERNELS resolve to here, and which optional trackers / front ends are installed. A library that is
missing (or fails to import) is printed as "not installed" (with the reason when it is there but broken), never
as a traceback: the report is most wanted on exactly the machines where something is missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys

MISSING = "not installed"

# (label, import name, distribution names tried for the version when the module has no __version__)
LIBRARIES = (
    ("megatron-core", "megatron.core", ("megatron-core", "megatron_core")),
    ("Transformer Engine", "transformer_engine", ("transformer-engine", "transformer_engine")),
    ("Triton", "triton", ("triton",)),
    ("DALI", "nvidia.dali", ("nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali-cuda130")),
    ("PyAV", "av", ("av",)),
    ("zarr", "zarr", ("zarr",)),
    ("diffusers", "diffusers", ("diffusers",)),
    ("transformers", "transformers", ("transformers",)),
)
TRACKERS = (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("matplotlib", "matplotlib"), ("gradio", "gradio"))


def megawan_version() -> str:
    """megawan.__version__: the one version (setup.py reads it from there too)."""
    import megawan

    return megawan.__version__


def module_version(module: str, distributions: tuple = ()) -> str:
    """The version of `module` (from its distribution's metadata: no import, so the report stays quick), MISSING
    when it is not there, or "broken (reason)" when it has no metadata and fails to import."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # its parent package is missing
        found = False
    if not found:
        return MISSING
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # e.g. a build against another torch
        return f"broken ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    return str(getattr(mod, "__version__", None) or "installed (version unknown)")


def _torch_items() -> list:
    try:
        import torch
    except Exception as e:
        return [("torch", MISSING if isinstance(e, ModuleNotFoundError) else f"broken ({e})"), ("CUDA", MISSING),
                ("NCCL", MISSING), ("cuDNN", MISSING), ("GPUs", "none")]
    nccl = MISSING
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:
            nccl = f"unavailable ({e})"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gpus = [f"{i}: {torch.cuda.get_device_name(i)}, {torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB"
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return [("torch", torch.__version__), ("CUDA", torch.version.cuda or "none (a CPU build of torch)"),
            ("NCCL", nccl), ("cuDNN", str(cudnn) if cudnn else MISSING),
            ("GPUs", "; ".join(gpus) if gpus else "none")]


def _pyav_h264() -> str:
    """Whether PyAV can write the H.264 mp4s megawan writes (else media falls back: megawan.utils.media)."""
    try:
        import av
    except Exception:
        return MISSING
    for name in ("libx264", "h264", "libopenh264"):
        try:
            av.codec.Codec(name, "w")
            return f"yes ({name})"
        except Exception:
            continue
    return "no H.264 encoder in this PyAV build"


def _resolved() -> list:
    """What `model.backend: auto` and MEGAWAN_KERNELS resolve to on this machine."""
    try:
        from megawan.capabilities import resolve_backend
        backend = resolve_backend("auto")
        why = ("Transformer Engine and CUDA are usable" if backend == "te"
               else "no usable Transformer Engine with CUDA here")
        backend = f"{backend} ({why}; preflight may still pick local for a layout TE cannot take)"
    except Exception as e:
        backend = f"unknown ({type(e).__name__}: {e})"
    choice = os.environ.get("MEGAWAN_KERNELS", "auto")
    try:
        import torch

        from kernels.dispatch import MODES, kernel_mode
        if choice not in MODES:
            kernels = f"{choice!r} is not one of {', '.join(MODES)}"
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            kernels = f"{kernel_mode(torch.empty(0, device=device))} on {device}"
    except Exception as e:
        kernels = f"unknown ({type(e).__name__}: {e})"
    return [("backend: auto", backend), (f"MEGAWAN_KERNELS={choice}", kernels)]


def collect() -> list:
    """(label, value) pairs, in the order `report` prints them."""
    items = [("megawan", megawan_version()), ("Python", platform.python_version() + f" ({sys.executable})")]
    items += _torch_items()
    items += [(label, module_version(module, dists)) for label, module, dists in LIBRARIES]
    items.append(("PyAV H.264 encoder", _pyav_h264()))
    items += _resolved()
    items += [(f"tracker {label}", module_version(module, (module,))) for label, module in TRACKERS]
    return items


def report() -> str:
    items = collect()
    width = max(len(label) for label, _ in items)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in items)
