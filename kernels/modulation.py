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


# ----------------------------------------------------------------------------------------------
# Backward. A program owns ROWS consecutive tokens of one sample j: it writes their input gradients and sums the
# modulation gradients of its tokens into one partial row (fp32) when the modulation is per sample; the host adds
# the partials (no atomics: the result does not depend on scheduling). Per-token modulation gets its gradient
# row by row.


@triton.jit
def _backward_row(block, r, j, seq, batch, dim, cols, ROWS: tl.constexpr):
    """Row r of backward program (block, j): its token i, the column mask (all off past the last token: a tail
    program) and the row's offset in x [s, b, D]."""
    i = block * ROWS + r
    return i, cols < tl.where(i < seq, dim, 0), (i * batch + j) * dim


@triton.jit
def _modulate_backward_kernel(x_ptr, scale_ptr, dout_ptr, dx_ptr, dscale_ptr, dshift_ptr, seq, batch, dim,
                              sc_s, sc_b, eps, ROWS: tl.constexpr, PER_TOKEN_SCALE: tl.constexpr,
                              PER_TOKEN_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    block, j = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    in_row = cols < dim
    dscale_acc = tl.zeros([BLOCK], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(ROWS):
        i, mask, base = _backward_row(block, r, j, seq, batch, dim, cols, ROWS)
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + i * sc_s + j * sc_b + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / dim
        diff = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / dim + eps)
        xhat = diff * rstd
        dxhat = dout * (1.0 + scale)
        # LayerNorm without affine: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
        dx = rstd * (dxhat - tl.sum(dxhat, axis=0) / dim - xhat * (tl.sum(dxhat * xhat, axis=0) / dim))
        tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if PER_TOKEN_SCALE:
            tl.store(dscale_ptr + base + cols, dout * xhat, mask=mask)
        else:
            dscale_acc += dout * xhat
        if PER_TOKEN_SHIFT:
            tl.store(dshift_ptr + base + cols, dout, mask=mask)
        else:
            dshift_acc += dout
    partial = (block * batch + j) * dim
    if not PER_TOKEN_SCALE:
        tl.store(dscale_ptr + partial + cols, dscale_acc, mask=in_row)
    if not PER_TOKEN_SHIFT:
        tl.store(dshift_ptr + partial + cols, dshift_acc, mask=in_row)


@triton.jit
def _gated_residual_backward_kernel(y_ptr, gate_ptr, dout_ptr, dy_ptr, dgate_ptr, seq, batch, dim, g_s, g_b,
                                    ROWS: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
    block, j = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    in_row = cols < dim
    dgate_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(ROWS):
        i, mask, base = _backward_row(block, r, j, seq, batch, dim, cols, ROWS)
        y = tl.load(y_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + i * g_s + j * g_b + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + base + cols, (dout * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        if PER_TOKEN:
            tl.store(dgate_ptr + base + cols, dout * y, mask=mask)
        else:
            dgate_acc += dout * y
    if not PER_TOKEN:
        tl.store(dgate_ptr + (block * batch + j) * dim + cols, dgate_acc, mask=in_row)


def warps_for(block: int) -> int:
    """Warps for a program that holds whole rows of `block` values: ~256 values per warp (Triton's LayerNorm
    tutorial rule), up to 16 so that a 5120-wide row's several live fp32 vectors stay in registers."""
    return min(max(block // 256, 1), 16)


def rows_per_program(seq: int) -> int:
    """Tokens per backward program: enough programs to fill a GPU (~256 per sample), few partial rows to add."""
    return max(1, min(64, triton.cdiv(seq, 256)))


def _param_grad(buffer: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A modulation gradient from the kernel's fp32 buffer: per token as written, per sample the partials' sum."""
    grad = buffer if param.shape[0] != 1 else buffer.sum(0, keepdim=True)
    return grad.to(param.dtype)


def modulate_backward_triton(x, scale, shift, dout, eps: float, rows: int | None = None):
    """(dx, dscale, dshift) of modulate_triton for the output gradient dout; `rows` tokens per program (default:
    rows_per_program)."""
    x, dout = x.contiguous(), dout.contiguous()
    scale_rows, sc_s, sc_b = _rows(x, scale, "scale")
    s, b, d = x.shape
    rows = rows or rows_per_program(s)
    blocks = triton.cdiv(s, rows)
    per_token_scale, per_token_shift = scale.shape[0] != 1, shift.shape[0] != 1
    dx = torch.empty_like(x)
    dscale = torch.empty((s if per_token_scale else blocks, b, d), device=x.device, dtype=torch.float32)
    dshift = torch.empty((s if per_token_shift else blocks, b, d), device=x.device, dtype=torch.float32)
    _modulate_backward_kernel[(blocks, b)](x, scale_rows, dout, dx, dscale, dshift, s, b, d, sc_s, sc_b, eps,
                                           ROWS=rows, PER_TOKEN_SCALE=per_token_scale,
                                           PER_TOKEN_SHIFT=per_token_shift, BLOCK=triton.next_power_of_2(d),
                                           num_warps=warps_for(triton.next_power_of_2(d)))
    return dx, _param_grad(dscale, scale), _param_grad(dshift, shift)


def gated_residual_backward_triton(y, gate, dout, rows: int | None = None):
    """(dx, dy, dgate) of gated_residual_triton: dx is dout itself (x enters the sum unscaled)."""
    y, dout = y.contiguous(), dout.contiguous()
    gate_rows, g_s, g_b = _rows(y, gate, "gate")
    s, b, d = y.shape
    rows = rows or rows_per_program(s)
    blocks = triton.cdiv(s, rows)
    per_token = gate.shape[0] != 1
    dy = torch.empty_like(y)
    dgate = torch.empty((s if per_token else blocks, b, d), device=y.device, dtype=torch.float32)
    _gated_residual_backward_kernel[(blocks, b)](y, gate_rows, dout, dy, dgate, s, b, d, g_s, g_b, ROWS=rows,
                                                 PER_TOKEN=per_token, BLOCK=triton.next_power_of_2(d),
                                                 num_warps=warps_for(triton.next_power_of_2(d)))
    return dout, dy, _param_grad(dgate, gate)
