"""FP8 linears on plain torch, for the `local` backend where Transformer Engine is absent.

HYBRID formats as Transformer Engine's: activations and weights in E4M3 for the forward, gradients in E5M2 for the
backward (both the data-gradient g·w and the weight-gradient gᵀ·x products); every product through
`torch._scaled_mm` with fp32 accumulation and the inverse scales applied on output. Weights stay bf16 / fp32 (the
optimizer's main copies are untouched); only the matrix products run in FP8. Per-tensor scaling, two recipes:

- current: the scale from this tensor's own amax (one extra read of it);
- delayed: the scale from the largest amax of the last `amax_history` passes of the same tensor slot (input,
  weight, output gradient) of the same linear (TE's DelayedScaling, amax_compute_algo="max", margin 0), so the
  cast needs no amax pass first; the cast records this pass's amax for the next. A linear's first pass (and the
  first after a resume: the history is not checkpointed, see AmaxHistory) scales by its current amax.

On CUDA (kernel_mode "triton") each cast is kernels/fp8_transpose.py's fused cast-and-transpose: the forward
saves the transposed copies of x and w that the backward's products take, and the gradient's cast writes both
layouts, so the backward has no transpose pass; elsewhere torch casts (kernels.dispatch.quantize_fp8 /
kernels.reference.cast_fp8) and transposes.

    with local_fp8():                     # megawan.training.precision.fp8_context(...) on the local backend
        y = model(x, t, text)             # every Fp8ColumnParallelLinear / Fp8RowParallelLinear multiplies in FP8
    with local_fp8(recipe="delayed", amax_history=16): ...

Outside the context the classes are megatron-core's ColumnParallelLinear / RowParallelLinear unchanged.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)

from kernels import reference
from kernels.dispatch import kernel_mode, quantize_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("current", "delayed")
_STATE = {"enabled": False, "attention": False, "recipe": "current", "amax_history": 1024}


@contextlib.contextmanager
def local_fp8(enabled: bool = True, attention: bool = False, recipe: str = "current", amax_history: int = 1024):
    """FP8 products in the linears; attention=True: the self-attention too (kernels/fp8_flash_attention.py).
    recipe: current | delayed scaling; amax_history: delayed scaling's history length."""
    if recipe not in RECIPES or amax_history < 1:
        raise ValueError(f"local_fp8: recipe {recipe!r} (current | delayed), amax_history {amax_history} (>= 1)")
    previous = dict(_STATE)
    _STATE.update(enabled=enabled, attention=enabled and attention, recipe=recipe, amax_history=amax_history)
    try:
        yield
    finally:
        _STATE.update(previous)


def fp8_enabled() -> bool:
    return _STATE["enabled"]


def fp8_attention_enabled() -> bool:
    return _STATE["attention"]


class AmaxHistory:
    """Delayed scaling's state for one linear: the amaxes of its input (row 0), weight (1) and output gradient
    (2) over the last `length` recorded passes, fp32 [3, length] on the device (filled in place: no host sync).

    A plain attribute of the linear, not a buffer, and deliberately not checkpointed (TE keeps it in extra_state):
    checkpoints stay identical with and without FP8 (bf16, TE and local runs load each other's, the exporters see
    no extra keys), and a resumed run rebuilds the history in `length` steps, its first pass scaling by the
    current amax. Only passes that build a graph record (a no-grad forward does not); under activation recompute
    (torch's non-reentrant checkpoint runs the forward with a graph, then again inside the backward) the recompute
    casts with the scale its forward used and records nothing."""

    def __init__(self, length: int, device):
        self.amax = torch.zeros(3, length, device=device)
        self.recorded = [0, 0, 0]
        # the scales forwards used for x and w, for their recompute (bounded: a linear outside any recomputed
        # region never pops, its oldest entries fall off)
        self.used = (collections.deque(maxlen=64), collections.deque(maxlen=64))

    def scale(self, row: int, dtype) -> Optional[torch.Tensor]:
        """finfo(dtype).max / max(history), or None before the first record (then: current scaling)."""
        if not self.recorded[row]:
            return None
        return torch.finfo(dtype).max / self.amax[row].amax().clamp_min(1e-12)

    def slot(self, row: int) -> torch.Tensor:
        """The 0-d view this pass's amax goes into (the oldest entry, overwritten)."""
        view = self.amax[row, self.recorded[row] % self.amax.shape[1]]
        self.recorded[row] += 1
        return view


def _scale_of(t, dtype, history: Optional[AmaxHistory], row: int, record: bool):
    """(the scale t is cast with, or None for plain current scaling; whether this pass records its amax).
    A forward run inside the backward is activation recompute: it takes the scale its original forward used
    (queued there, first in first out, as micro-batches' backwards follow their forwards) and records nothing."""
    if history is None:
        return None, False
    recompute = row < 2 and torch._C._current_graph_task_id() != -1
    if recompute and history.used[row]:
        return history.used[row].popleft(), False
    scale = history.scale(row, dtype)
    if scale is None:  # the first pass: its own amax
        scale = torch.finfo(dtype).max / _amax(t).clamp_min(1e-12)
    if record and not recompute and row < 2:
        history.used[row].append(scale)
    return scale, record and not recompute


def _amax(t):
    return torch.linalg.vector_norm(t.detach(), float("inf"), dtype=torch.float32)


def _quantize(t, dtype, history: Optional[AmaxHistory], row: int, record: bool, transposed: bool):
    """(q, its transpose made contiguous or None, the inverse scale) of the 2D tensor t. transposed: write the
    transposed copy in the cast's pass when the fused kernel runs (else None: the caller transposes if needed)."""
    scale, record = _scale_of(t, dtype, history, row, record)
    fused = kernel_mode(t) == "triton"
    if scale is None:  # current scaling
        if not fused:
            q, inv = quantize_fp8(t, dtype)  # eager or compiled torch
            return q, None, inv
        scale = torch.finfo(dtype).max / _amax(t).clamp_min(1e-12)
    slot = history.slot(row) if record else None
    if fused:
        from kernels.fp8_transpose import cast_transpose  # Triton: an optional dependency

        if slot is not None:
            slot.zero_()
        q, q_t = cast_transpose(t, scale, dtype, amax=slot)  # the amax comes out of the cast's own pass
        return q, q_t if transposed else None, scale.reciprocal()
    if slot is not None:
        slot.copy_(_amax(t))
    return reference.cast_fp8(t, scale, dtype), None, scale.reciprocal()


def _mm(a, sa, b_t, sb, out_dtype):
    """a [M, K] @ b [K, N] given b's transpose b_t [N, K] row-major, i.e. b column-major as _scaled_mm wants."""
    return torch._scaled_mm(a.contiguous(), b_t.contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x wᵀ with x [N, in] and w [out, in] in E4M3; dgrad and wgrad with the gradient in E5M2."""

    @staticmethod
    def forward(ctx, x, w, history, record):
        need_x, need_w = ctx.needs_input_grad[:2]
        qx, qx_t, sx = _quantize(x, E4M3, history, 0, record, transposed=need_w)
        qw, qw_t, sw = _quantize(w, E4M3, history, 1, record, transposed=need_x)
        # the backward's operands: xᵀ and wᵀ row-major (the fused cast wrote them; else transposed there)
        ctx.save_for_backward(qx if qx_t is None else qx_t, sx, qw if qw_t is None else qw_t, sw)
        ctx.transposed = (qx_t is not None, qw_t is not None)
        ctx.dtypes, ctx.history = (x.dtype, w.dtype), history
        return _mm(qx, sx, qw, sw, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_saved, sx, w_saved, sw = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        qg, qg_t, sg = _quantize(grad, E5M2, ctx.history, 2, True, transposed=need_w)
        grad_x = grad_w = None
        if need_x:  # [N, out] @ [out, in]: w column-major is wᵀ row-major
            w_t = w_saved if ctx.transposed[1] else w_saved.t()
            grad_x = _mm(qg, sg, w_t, sw, ctx.dtypes[0])
        if need_w:  # [out, N] @ [N, in]: gᵀ row-major, x column-major is xᵀ row-major
            x_t = x_saved if ctx.transposed[0] else x_saved.t()
            grad_w = _mm(qg.t() if qg_t is None else qg_t, sg, x_t, sx, ctx.dtypes[1])
        return grad_x, grad_w, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, history: Optional[AmaxHistory] = None):
    """x [..., in] @ weightᵀ (+ bias) with the product in FP8; history: delayed scaling's (None: current)."""
    record = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    out = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, history, record)
    out = out.view(*x.shape[:-1], weight.shape[0])
    return out + bias if bias is not None else out


def amax_history(linear: torch.nn.Module, weight: torch.Tensor) -> Optional[AmaxHistory]:
    """The linear's delayed-scaling state under local_fp8(recipe="delayed") (made on first use, or anew when the
    length or device changed), else None."""
    if _STATE["recipe"] != "delayed":
        return None
    history = linear.__dict__.get("_fp8_amax_history")
    if history is None or history.amax.shape[1] != _STATE["amax_history"] or history.amax.device != weight.device:
        history = AmaxHistory(_STATE["amax_history"], weight.device)
        linear.__dict__["_fp8_amax_history"] = history  # not a buffer / submodule: never in a state_dict
    return history


class Fp8ColumnParallelLinear(ColumnParallelLinear):
    def _forward_impl(self, input, weight, bias=None, allreduce_dgrad=False, sequence_parallel=False,
                      tp_group=None, **kwargs):
        if not fp8_enabled():
            return super()._forward_impl(input, weight, bias=bias, allreduce_dgrad=allreduce_dgrad,
                                         sequence_parallel=sequence_parallel, tp_group=tp_group, **kwargs)
        # the communication megatron's fused linear does, then our product
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return fp8_linear(input, weight, bias, amax_history(self, weight))


class Fp8RowParallelLinear(RowParallelLinear):
    def _forward_impl(self, input, weight, bias=None, **kwargs):
        if not fp8_enabled():
            return super()._forward_impl(input, weight, bias=bias, **kwargs)
        # the TP reduction follows in RowParallelLinear.forward
        return fp8_linear(input, weight, bias, amax_history(self, weight))
