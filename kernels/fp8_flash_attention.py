"""FP8 attention (bidirectional, no mask): softmax(q kᵀ · scale) v with both products in FP8 E4M3.

The anchor is the Wan report's 8-bit attention. q, k and v are quantised per head and per block of 128 tokens
(one fp32 scale each: the block's amax / 448, E4M3's largest value), so an outlier token only coarsens its own
block. Inside the kernel, for each tile of 128 queries and each tile of keys:

    S = (q8 · k8ᵀ) · s_q · s_k · scale           FP8 product, fp32 accumulation (Hopper: QGMMA)
    P = exp2(S·log2 e − m)  (online softmax)     fp32, in [0, 1]
    O += (P·448 → E4M3) · v8 · s_v / 448          FP8 product, fp32 accumulation; P scaled to use E4M3's range

and writes O (bf16) and the log-sum-exp of each query row (fp32, natural log). The backward is bf16: torch's
cuDNN (else flash) attention backward on CUDA, its flash backward on CPU, fed our O and log-sum-exp: nothing is
recomputed
(the gradient is the one of the bf16 attention evaluated at the FP8 forward's output, as FP8 attention
training does in Transformer Engine).

v is stored transposed ([b, h, d, s]) by the quantiser: Hopper's FP8 matrix instruction wants both operands
K-major, and for P·v the reduction runs over keys.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
QUANT_BLOCK = 128  # tokens per scale (q, k and v)
_FP8 = torch.float8_e4m3fn


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, scale_ptr, heads, seq, dim, sx_b, sx_h, sx_s, sx_d, so_b, so_h, so_s, so_d,
                     n_blocks, BLOCK: tl.constexpr, DIM: tl.constexpr):
    """One program per (batch·head, block of tokens): amax of the block, then x / (amax / 448) in E4M3."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DIM)
    x = tl.load(x_ptr + b * sx_b + h * sx_h + rows[:, None] * sx_s + cols[None, :] * sx_d,
                mask=(rows[:, None] < seq) & (cols[None, :] < dim), other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-12)
    scale = amax / 448.0
    q = (x / scale).to(tl.float8e4nv)  # rows past seq: zeros (the padding)
    tl.store(out_ptr + b * so_b + h * so_h + rows[:, None] * so_s + cols[None, :] * so_d, q,
             mask=cols[None, :] < dim)
    tl.store(scale_ptr + bh * n_blocks + blk, scale)


def quantize_blocks(x: torch.Tensor, transpose: bool = False):
    """x [b, h, s, d] (any strides) -> (E4M3 copy, [b, h, s_pad, d] contiguous or [b, h, d, s_pad] if transpose,
    s_pad = s rounded up to whole blocks of 128, zeros after s; fp32 dequantisation scales [b, h, s_pad / 128]).
    The padding keeps every row of the transposed copy 16-byte aligned (32,760 tokens is not: Triton then loses
    its wide loads, measured 2x slower) and every tile load in bounds."""
    b, h, s, d = x.shape
    n_blocks = triton.cdiv(s, QUANT_BLOCK)
    s_pad = n_blocks * QUANT_BLOCK
    out = torch.empty((b, h, d, s_pad) if transpose else (b, h, s_pad, d), device=x.device, dtype=_FP8)
    so = out.stride()
    so = (so[0], so[1], so[3], so[2]) if transpose else so
    scales = torch.empty((b, h, n_blocks), device=x.device, dtype=torch.float32)
    _quantize_kernel[(b * h, n_blocks)](x, out, scales, h, s, d, *x.stride(), *so, n_blocks,
                                        BLOCK=QUANT_BLOCK, DIM=triton.next_power_of_2(d))
    return out, scales


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs every config: one is enough
        return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
            for n in (64, 128) for w in (4, 8) for st in (2, 3, 4)]


@triton.autotune(configs=_configs(), key=["seq_q", "seq_k", "HEAD_DIM"])
@triton.jit
def _attention_kernel(q_ptr, k_ptr, vt_ptr, sq_ptr, sk_ptr, sv_ptr, o_ptr, lse_ptr, heads, seq_q, seq_k, qk_scale,
                      so_b, so_h, so_s, so_d, nq_blocks, nk_blocks,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr):
    """q8 [b·h, nq_blocks·128, d], k8 [b·h, nk_blocks·128, d], vt8 [b·h, d, nk_blocks·128]: padded with zeros."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    pad_q, pad_k = nq_blocks * QBLOCK, nk_blocks * QBLOCK
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + bh * pad_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    # the query block's dequantisation scale, the softmax scale and log2(e), folded into one factor
    q_scale = tl.load(sq_ptr + bh * nq_blocks + tile) * qk_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = k_ptr + bh * pad_k * HEAD_DIM
    vt_base = vt_ptr + bh * pad_k * HEAD_DIM
    for start in range(0, seq_k, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < seq_k
        k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        vt = tl.load(vt_base + offs_d[:, None] * pad_k + offs_n[None, :])
        k_scale = tl.load(sk_ptr + bh * nk_blocks + start // QBLOCK)
        v_scale = tl.load(sv_ptr + bh * nk_blocks + start // QBLOCK)
        s = tl.dot(q, tl.trans(k)) * (q_scale * k_scale)  # log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p8 = (p * 448.0).to(tl.float8e4nv)
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt)) * (v_scale / 448.0)
        m_i = m_new
    out = acc / l_i[:, None]
    row_ok = offs_m < seq_q
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * seq_q + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)


def fp8_attention_forward(q, k, v, scale=None, out=None):
    """q [b, h, s_q, d], k / v [b, h, s_k, d] (bf16 / fp16 / fp32, any strides) -> (out [b, h, s_q, d] in q's
    dtype, log-sum-exp [b, h, s_q] fp32). `out` may be a preallocated tensor of that shape with any strides."""
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    if d not in (16, 32, 64, 128, 256) or k.shape != (b, h, s_k, d) or v.shape != k.shape:
        raise ValueError(f"fp8 attention wants q [b, h, s, d] and k = v [b, h, s_k, d] with d a power of two in "
                         f"16..256; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q8, sq = quantize_blocks(q)
    k8, sk = quantize_blocks(k)
    vt8, sv = quantize_blocks(v, transpose=True)
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, s_q), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(s_q, QUANT_BLOCK), b * h)
    _attention_kernel[grid](q8, k8, vt8, sq, sk, sv, out, lse, h, s_q, s_k, scale, *out.stride(),
                            sq.shape[-1], sk.shape[-1], HEAD_DIM=d, BLOCK_M=QUANT_BLOCK, QBLOCK=QUANT_BLOCK)
    return out, lse


BACKWARDS = ("cudnn", "flash")  # CUDA: cuDNN's backward (measured 1.7x flash's on an H100), else flash's
_LAST = {"backward": None}


def last_backward() -> str:
    """Which backward ran last (cudnn / flash / cpu-flash): for tests and benchmarks."""
    return _LAST["backward"]


def _bf16_backward(grad, q, k, v, out, lse, scale):
    """bf16 gradients of attention given its output and log-sum-exp: torch's own attention backward kernels."""
    if not q.is_cuda:
        _LAST["backward"] = "cpu-flash"
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, scale=scale)
    s_q, s_k = q.shape[2], k.shape[2]
    errors = []
    for name in BACKWARDS:
        if name in _DISABLED:
            continue
        try:
            if name == "cudnn":
                seed = torch.zeros((), device=q.device, dtype=torch.int64)
                grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    grad, q, k, v, out, lse.unsqueeze(-1), seed, seed, None, None, None, s_q, s_k, 0.0, False,
                    scale=scale)
            else:
                empty = torch.empty(0, device=q.device, dtype=torch.int64)
                grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                    grad, q, k, v, out, lse, None, None, s_q, s_k, 0.0, False, empty, empty, scale=scale)
            _LAST["backward"] = name
            return grads
        except RuntimeError as e:  # this torch / GPU lacks the kernel for these shapes: the next one
            _DISABLED.add(name)
            errors.append(f"{name}: {str(e).splitlines()[0]}")
    raise RuntimeError("no attention backward ran: " + "; ".join(errors))


_DISABLED: set = set()


class FP8Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        # written sequence-first ([s, b, h, d] memory, seen as [b, h, s, d]): the model's layout, so the caller's
        # permute back to [s, b, h * d] costs no copy
        b, h, s, d = q.shape
        out = torch.empty((s, b, h, d), device=q.device, dtype=q.dtype).permute(1, 2, 0, 3)
        out, lse = fp8_attention_forward(q, k, v, scale, out)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _bf16_backward(grad.contiguous(), q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


def fp8_attention(q, k, v, scale=None):
    """Differentiable FP8 attention: q [b, h, s_q, d], k / v [b, h, s_k, d] -> [b, h, s_q, d]."""
    return FP8Attention.apply(q, k, v, scale)
