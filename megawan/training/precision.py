"""FP8 training: the context the trainer puts around each forward.

    with fp8_context(cfg.train.fp8, backend):   # None -> no-op; te: TE autocast; local: plain torch FP8
        output = model(x_t, timestep, text)

On the `local` backend (no Transformer Engine) the linears' products run through torch._scaled_mm with the
same two recipes (megawan.models.dit.fp8_linear: its own amax history for "delayed", not checkpointed).

Recipes (TE's transformer_engine.common.recipe): "delayed" = DelayedScaling (HYBRID: E4M3 forward, E5M2
gradients; scale from the max of the amax history of the last train.fp8_amax_history steps, 1024 by default
as Megatron-LM's), "current" = Float8CurrentScaling (per-tensor scale from this step's amax).
train.fp8_attention sets the recipe's fp8_dpa: TE then runs every DotProductAttention in FP8 (cuDNN's fused
attention; with current scaling TE keeps delayed scaling for the softmax's S and dP). Only TE's linears and
attention run in FP8; norms, modulation, RoPE and the loss stay in bf16 / fp32. Weights stay bf16 with fp32
main copies in the optimizer.

Amaxes are reduced over megatron's amax group (TP x DP x CP, as Megatron-LM's get_fp8_context), so every rank
of a sequence-parallel all-gather quantises with the same scale. Calls into TE are checked against its
recorded signatures by tests/test_te_contract.py (tests/data/te_api.json).
"""

from __future__ import annotations

import contextlib
from typing import Optional

from megatron.core import parallel_state

from megawan.capabilities import transformer_engine_available
from megawan.models.dit.fp8_linear import local_fp8

RECIPES = ("delayed", "current")


def fp8_recipe(name: str, attention: bool = False, amax_history: int = 1024):
    """attention: FP8 dot-product attention as well (the recipe's fp8_dpa); amax_history: delayed scaling's."""
    from transformer_engine.common import recipe

    if name == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=amax_history,
                                     amax_compute_algo="max", fp8_dpa=attention, fp8_mha=False)
    if name == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID, fp8_dpa=attention, fp8_mha=False)
    raise ValueError(f"train.fp8: {name!r} is not one of {RECIPES}")


def amax_reduction_group():
    """The group FP8 amaxes are reduced over: megatron's TP x DP x CP group (None in a lone process)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_amax_reduction_group(with_context_parallel=True)


def fp8_context(name: Optional[str], backend: str = "te", attention: bool = False, amax_history: int = 1024):
    """The context manager for one forward pass: a no-op without FP8. attention (train.fp8_attention): the
    attention's two products in FP8 too (TE: fp8_dpa; local: the Triton kernel kernels/fp8_flash_attention.py,
    self-attention only)."""
    if not name:
        return contextlib.nullcontext()
    if name not in RECIPES:
        raise ValueError(f"train.fp8: {name!r} is not one of {RECIPES}")
    if backend == "local":
        return local_fp8(attention=attention, recipe=name, amax_history=amax_history)
    if not transformer_engine_available():
        raise RuntimeError(f"train.fp8={name!r} needs Transformer Engine >= 2.9 and a CUDA device on model.backend="
                           "te; model.backend=local runs FP8 without them")
    import transformer_engine.pytorch as te

    return te.autocast(enabled=True, recipe=fp8_recipe(name, attention, amax_history),
                       amax_reduction_group=amax_reduction_group())
