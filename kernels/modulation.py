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
def _row(batch, dim, BLOCK: tl.constexpr):
    """This program's row r = (i, j) of x [s, b, D]: (i, j, offset of the row, column indices, their mask)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    return row // batch, row % batch, row * dim, cols, cols < dim


@triton.jit
def _modulate_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, batch, dim, sc_s, sc_b, sh_s, sh_b, eps,
                     BLOCK: tl.constexpr):
    i, j, base, cols, mask = _row(batch, dim, BLOCK)
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / dim
    y = diff * (1.0 / tl.sqrt(var + eps))
    scale = tl.load(scale_ptr + i * sc_s + j * sc_b + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + i * sh_s + j * sh_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + cols, (y * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, batch, dim, g_s, g_b, BLOCK: tl.constexpr):
    i, j, base, cols, mask = _row(batch, dim, BLOCK)
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + i * g_s + j * g_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + cols, (x + y * g).to(out_ptr.dtype.element_ty), mask=mask)


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
    scale, sc_s, sc_b = _rows(x, scale, "scale")
    shift, sh_s, sh_b = _rows(x, shift, "shift")
    out = torch.empty_like(x)
    s, b, d = x.shape
    _modulate_kernel[(s * b,)](x, scale, shift, out, b, d, sc_s, sc_b, sh_s, sh_b, eps,
                               BLOCK=triton.next_power_of_2(d))
    return out


def gated_residual_triton(x, y, gate):
    x, y = x.contiguous(), y.contiguous()
    gate, g_s, g_b = _rows(x, gate, "gate")
    out = torch.empty_like(x)
    s, b, d = x.shape
    _gated_residual_kernel[(s * b,)](x, y, gate, out, b, d, g_s, g_b, BLOCK=triton.next_power_of_2(d))
    return out
