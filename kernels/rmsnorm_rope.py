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
