"""Wan's adaptive LayerNorm (LayerNorm, then (1 + scale) and shift) and its gated residual add, one row of the
hidden size per program: one read and one write of the activations instead of torch's five passes.

x is [s, b, D] (any leading shape flattened to rows); scale / shift / gate are [1 or s, b, D] (Wan's
modulation is per sample, or per token for TI2V): row r = (i, j) reads them at i * stride_s + j * stride_b.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _modulate_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, batch, dim, s_stride_s, s_stride_b, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i, j = row // batch, row % batch
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / dim
    y = diff * (1.0 / tl.sqrt(var + eps))
    offset = i * s_stride_s + j * s_stride_b
    scale = tl.load(scale_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
    out = y * (1.0 + scale) + shift
    tl.store(out_ptr + row * dim + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, batch, dim, g_stride_s, g_stride_b,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i, j = row // batch, row % batch
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + i * g_stride_s + j * g_stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (x + y * g).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, param: torch.Tensor, name: str):
    """(seq, batch, strides of param over seq and batch) for x [s, b, D] and param [1 or s, b, D]."""
    if x.dim() != 3 or param.dim() != 3 or param.shape[1:] != x.shape[1:] or param.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} {tuple(param.shape)} does not broadcast as [1 or s, b, D] over x {tuple(x.shape)}")
    if param.stride(-1) != 1:
        param = param.contiguous()
    stride_s = 0 if param.shape[0] == 1 else param.stride(0)
    return param, stride_s, param.stride(1)


def modulate_triton(x, scale, shift, eps: float):
    x = x.contiguous()
    scale, s_s, s_b = _rows(x, scale, "scale")
    shift, t_s, t_b = _rows(x, shift, "shift")
    if (t_s, t_b) != (s_s, s_b):
        shift = shift.expand_as(scale).contiguous() if s_s else shift.contiguous()
        scale, s_s, s_b = _rows(x, scale.contiguous(), "scale")
        shift, _, _ = _rows(x, shift.contiguous(), "shift")
    out = torch.empty_like(x)
    s, b, d = x.shape
    _modulate_kernel[(s * b,)](x, scale, shift, out, b, d, s_s, s_b, eps, BLOCK=triton.next_power_of_2(d))
    return out


def gated_residual_triton(x, y, gate):
    x, y = x.contiguous(), y.contiguous()
    gate, g_s, g_b = _rows(x, gate, "gate")
    out = torch.empty_like(x)
    s, b, d = x.shape
    _gated_residual_kernel[(s * b,)](x, y, gate, out, b, d, g_s, g_b, BLOCK=triton.next_power_of_2(d))
    return out
