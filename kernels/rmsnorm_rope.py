"""q / k RMSNorm over the full hidden size followed by Wan's 3D RoPE, one token (all heads) per program: the
normalised vector never goes back to memory between the norm and the rotation.

x [s, b, heads * head_dim]; weight [heads * head_dim]; cos / sin [s, head_dim / 2] (the 3D tables flattened
per token). Pairs (2i, 2i + 1) of each head rotate by angle i. The norm is rounded to x's dtype before the
rotation, as the unfused model does (RMSNorm module, then RoPE).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.modulation import warps_for


@triton.jit
def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, batch, hidden, half, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    token = row // batch
    pairs = tl.arange(0, BLOCK)  # pair p covers elements 2p, 2p + 1 of the hidden vector
    mask = pairs < hidden // 2
    base = x_ptr + row * hidden
    x1 = tl.load(base + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    rms = tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / hidden + eps)
    w1 = tl.load(w_ptr + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 / rms * w1).to(out_ptr.dtype.element_ty).to(tl.float32)
    y2 = (x2 / rms * w2).to(out_ptr.dtype.element_ty).to(tl.float32)
    angle = pairs % half  # the pair's index inside its head
    c = tl.load(cos_ptr + token * half + angle, mask=mask, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + token * half + angle, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + row * hidden
    tl.store(out + 2 * pairs, (y1 * c - y2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + 2 * pairs + 1, (y1 * s + y2 * c).to(out_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope_triton(x, weight, cos, sin, heads: int, eps: float):
    s, b, hidden = x.shape
    half = hidden // heads // 2
    if cos.shape != (s, half) or sin.shape != (s, half):
        raise ValueError(f"cos / sin must be [{s}, {half}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    _qk_norm_rope_kernel[(s * b,)](x, weight.contiguous(), cos.float().contiguous(), sin.float().contiguous(), out,
                                   b, hidden, half, eps, BLOCK=triton.next_power_of_2(hidden // 2))
    return out.unflatten(-1, (heads, -1))


@triton.jit
def _qk_norm_rope_backward_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, dout_ptr, dx_ptr, dw_ptr, rows_total, batch,
                                  hidden, half, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS consecutive rows (tokens x samples) per program: their dx, and their share of dweight as one fp32
    partial row (the host adds the partials)."""
    block = tl.program_id(0)
    pairs = tl.arange(0, BLOCK)
    in_row = pairs < hidden // 2
    w1 = tl.load(w_ptr + 2 * pairs, mask=in_row, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + 2 * pairs + 1, mask=in_row, other=0.0).to(tl.float32)
    dw1_acc = tl.zeros([BLOCK], dtype=tl.float32)
    dw2_acc = tl.zeros([BLOCK], dtype=tl.float32)
    angle = pairs % half
    for r in range(ROWS):
        row = block * ROWS + r
        mask = pairs < tl.where(row < rows_total, hidden // 2, 0)  # past the last row: nothing
        token = row // batch
        base = row * hidden
        x1 = tl.load(x_ptr + base + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
        d1 = tl.load(dout_ptr + base + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
        d2 = tl.load(dout_ptr + base + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + token * half + angle, mask=mask, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + token * half + angle, mask=mask, other=0.0).to(tl.float32)
        # the rotation's transpose takes the gradient back to the normalised vector (the rounding to x's dtype
        # between them passes gradients through unchanged, as autograd's cast does)
        dy1 = d1 * c + d2 * s
        dy2 = d2 * c - d1 * s
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / hidden + eps)
        xhat1, xhat2 = x1 * rstd, x2 * rstd
        dw1_acc += dy1 * xhat1
        dw2_acc += dy2 * xhat2
        g1, g2 = dy1 * w1, dy2 * w2
        # RMSNorm: dx = rstd (g - xhat mean(g xhat))
        proj = (tl.sum(g1 * xhat1, axis=0) + tl.sum(g2 * xhat2, axis=0)) / hidden
        tl.store(dx_ptr + base + 2 * pairs, (rstd * (g1 - xhat1 * proj)).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + base + 2 * pairs + 1, (rstd * (g2 - xhat2 * proj)).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + block * hidden + 2 * pairs, dw1_acc, mask=in_row)
    tl.store(dw_ptr + block * hidden + 2 * pairs + 1, dw2_acc, mask=in_row)


def qk_norm_rope_backward_triton(x, weight, cos, sin, dout, heads: int, eps: float, rows: int | None = None):
    """(dx, dweight) of qk_norm_rope_triton for the output gradient dout [s, b, heads, head_dim]."""
    s, b, hidden = x.shape
    half = hidden // heads // 2
    x, dout = x.contiguous(), dout.contiguous()
    rows_total = s * b
    rows = rows or max(1, min(64, triton.cdiv(rows_total, 512)))  # rows (tokens x samples) per program
    blocks = triton.cdiv(rows_total, rows)
    block = triton.next_power_of_2(hidden // 2)
    dx = torch.empty_like(x)
    dw = torch.empty((blocks, hidden), device=x.device, dtype=torch.float32)
    _qk_norm_rope_backward_kernel[(blocks,)](x, weight.contiguous(), cos.float().contiguous(),
                                             sin.float().contiguous(), dout, dx, dw, rows_total, b, hidden, half,
                                             eps, ROWS=rows, BLOCK=block, num_warps=warps_for(block))
    return dx, dw.sum(0).to(weight.dtype)
