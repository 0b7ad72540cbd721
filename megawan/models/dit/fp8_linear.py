"""FP8 linears on plain torch, for the `local` backend where Transformer Engine is absent.

Current (per-tensor, this step's amax) scaling, HYBRID formats as Transformer Engine's: activations and
weights in E4M3 for the forward, gradients in E5M2 for the backward; every product through
`torch._scaled_mm` with fp32 accumulation and the inverse scales applied on output. Weights stay bf16 / fp32
(the optimizer's main copies are untouched); only the matrix products run in FP8.

    with local_fp8():              # megawan.training.precision.fp8_context("current") on the local backend
        y = model(x, t, text)      # every Fp8ColumnParallelLinear / Fp8RowParallelLinear multiplies in FP8

Outside the context the classes are megatron-core's ColumnParallelLinear / RowParallelLinear unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)

from kernels.dispatch import quantize_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_STATE = {"enabled": False, "attention": False}


@contextlib.contextmanager
def local_fp8(enabled: bool = True, attention: bool = False):
    """FP8 products in the linears; attention=True: the self-attention too (kernels/fp8_flash_attention.py)."""
    previous = dict(_STATE)
    _STATE.update(enabled=enabled, attention=enabled and attention)
    try:
        yield
    finally:
        _STATE.update(previous)


def fp8_enabled() -> bool:
    return _STATE["enabled"]


def fp8_attention_enabled() -> bool:
    return _STATE["attention"]




def _col(m: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major, as _scaled_mm wants its second operand on GPU."""
    return m.t().contiguous().t()


def _mm(a, sa, b, sb, out_dtype):
    return torch._scaled_mm(a.contiguous(), _col(b), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x wᵀ with x [N, in] and w [out, in] in E4M3; dgrad and wgrad with the gradient in E5M2."""

    @staticmethod
    def forward(ctx, x, w):
        qx, sx = quantize_fp8(x, E4M3)  # (values in E4M3, the inverse scale)
        qw, sw = quantize_fp8(w, E4M3)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.dtypes = (x.dtype, w.dtype)
        return _mm(qx, sx, qw.t(), sw, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        qx, sx, qw, sw = ctx.saved_tensors
        qg, sg = quantize_fp8(grad, E5M2)
        grad_x = _mm(qg, sg, qw, sw, ctx.dtypes[0])  # [N, out] @ [out, in]
        grad_w = _mm(qg.t(), sg, qx, sx, ctx.dtypes[1])  # [out, N] @ [N, in]
        return grad_x, grad_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x [..., in] @ weightᵀ (+ bias) with the product in FP8."""
    out = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return out + bias if bias is not None else out


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
        return fp8_linear(input, weight, bias)


class Fp8RowParallelLinear(RowParallelLinear):
    def _forward_impl(self, input, weight, bias=None, **kwargs):
        if not fp8_enabled():
            return super()._forward_impl(input, weight, bias=bias, **kwargs)
        return fp8_linear(input, weight, bias)  # the TP reduction follows in RowParallelLinear.forward
