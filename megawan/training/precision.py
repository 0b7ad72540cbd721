"""FP8 training: the context the trainer puts around each forward.

    with fp8_context(cfg.train.fp8, backend):   # None -> no-op; te: TE fp8_autocast; local: plain torch FP8
        output = model(x_t, timestep, text)

On the `local` backend (no Transformer Engine) "current" scaling runs the linears' products through
torch._scaled_mm (megawan.models.dit.fp8_linear); "delayed" needs Transformer Engine.

Recipes: "delayed" = DelayedScaling (HYBRID: E4M3 forward, E5M2 gradients; scale from the amax history of
the last 1024 steps, as Megatron-LM's default), "current" = Float8CurrentScaling (per-tensor scale from this
step's amax). Only the Transformer Engine linears run in FP8; norms, modulation, RoPE and the loss stay in
bf16 / fp32. Weights stay bf16 with fp32 main copies in the optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from megawan.capabilities import transformer_engine_available
from megawan.models.dit.fp8_linear import local_fp8

RECIPES = ("delayed", "current")


def fp8_recipe(name: str, attention: bool = False):
    """attention: FP8 dot-product attention as well (TE's fp8_dpa, fused cuDNN FP8 attention)."""
    from transformer_engine.common import recipe

    if name == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=1024,
                                     amax_compute_algo="max", fp8_dpa=attention, fp8_mha=False)
    if name == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID, fp8_dpa=attention)
    raise ValueError(f"train.fp8: {name!r} is not one of {RECIPES}")


def fp8_context(name: Optional[str], backend: str = "te", attention: bool = False):
    """The context manager for one forward pass: a no-op without FP8. attention (train.fp8_attention): the
    self-attention's two products in FP8 too (TE: fp8_dpa; local: the Triton kernel kernels/fp8_flash_attention.py)."""
    if not name:
        return contextlib.nullcontext()
    if backend == "local":
        if name != "current":
            raise RuntimeError(f"train.fp8={name!r} needs Transformer Engine; the local backend does current scaling")
        return local_fp8(attention=attention)
    if not transformer_engine_available():
        raise RuntimeError(f"train.fp8={name!r} needs Transformer Engine and a CUDA device")
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe(name, attention))
