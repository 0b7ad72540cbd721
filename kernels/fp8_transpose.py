"""Fused FP8 cast-and-transpose: one read of a 2D bf16 / fp32 tensor writes its per-tensor scaled, saturated
E4M3 / E5M2 copy both row-major and transposed (Transformer Engine's cast_transpose, in Triton).

torch._scaled_mm wants its second operand column-major, and the FP8 linear's backward multiplies by the
transposes of the forward's operands (dgrad: g · w, wgrad: gᵀ · x), so plain torch pays a transpose pass
(a read and a write of a byte per value) for each of x, w and g on top of the cast. Here the transposed copy
comes out of the cast's own pass. Optionally the same pass also records the tensor's amax (delayed scaling:
the scale is known before the tensor is read, so amax and cast need not be two passes).

Rounding is done explicitly (round to nearest even on the format's grid, subnormals included) before the
final cast, so the bytes are the same on a GPU and in Triton's CPU interpreter (whose own fp8 cast rounds
some values down) and equal `kernels.reference.cast_transpose_fp8` exactly.

    q, q_t = cast_transpose(t, scale, torch.float8_e4m3fn)            # q = sat(t·scale), q_t = qᵀ contiguous
    q, q_t = cast_transpose(t, scale, torch.float8_e5m2, amax=buf)    # and buf = max(buf, amax(t)) (fp32, 0-d)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (mantissa bits, exponent of the smallest normal) of the two OCP FP8 formats
_FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


@triton.jit
def _round_to_grid(y, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    """y (fp32, |y| within the format's max) rounded to nearest even on the FP8 format's grid, still fp32."""
    a = tl.abs(y)
    # normals: round the fp32 mantissa to MANT bits (nearest, ties to even) with integer arithmetic
    drop: tl.constexpr = 23 - MANT
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & ~((1 << drop) - 1)
    normal = bits.to(tl.float32, bitcast=True)
    # subnormals: a fixed step 2^(MIN_EXP - MANT); adding 2^(MIN_EXP - MANT + 23) makes fp32's own
    # round-to-nearest-even drop exactly the bits below that step
    magic: tl.constexpr = 2.0 ** (MIN_EXP - MANT + 23)
    sub = (a + magic) - magic
    r = tl.where(a < 2.0 ** MIN_EXP, sub, normal)
    return tl.where(y < 0, -r, r)


@triton.jit
def _cast_transpose_kernel(x_ptr, scale_ptr, out_ptr, out_t_ptr, amax_ptr, M, N, stride_m, top,
                           MANT: tl.constexpr, MIN_EXP: tl.constexpr, AMAX: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if AMAX:
        tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    y = tl.minimum(tl.maximum(x * tl.load(scale_ptr), -top), top)
    r = _round_to_grid(y, MANT, MIN_EXP)  # on the FP8 grid: the casts below are exact
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], r.to(out_ptr.dtype.element_ty), mask=mask)
    # the same tile transposed in registers / shared memory (tl.trans), so that this store is coalesced too
    mask_t = (cols[:, None] < N) & (rows[None, :] < M)
    tl.store(out_t_ptr + cols[:, None] * M + rows[None, :], tl.trans(r).to(out_t_ptr.dtype.element_ty), mask=mask_t)


def cast_transpose(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None = None):
    """(t·scale saturated and cast to dtype [M, N] row-major, the same values transposed [N, M] row-major).
    t: 2D with unit stride along its last dim; scale: fp32 0-d / 1-element (the multiplier, not its inverse);
    amax: an fp32 0-d tensor raised in place to max(amax, max|t|). No host synchronisation."""
    if t.dim() != 2:
        raise ValueError(f"cast_transpose: a 2D tensor, got shape {tuple(t.shape)}")
    if t.stride(1) != 1:
        t = t.contiguous()
    mant, min_exp = _FORMATS[dtype]
    m, n = t.shape
    out = torch.empty((m, n), device=t.device, dtype=dtype)
    out_t = torch.empty((n, m), device=t.device, dtype=dtype)
    if t.numel() == 0:
        return out, out_t
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    _cast_transpose_kernel[grid](t.detach(), scale, out, out_t, amax if amax is not None else scale, m, n,
                                 t.stride(0), torch.finfo(dtype).max, MANT=mant, MIN_EXP=min_exp,
                                 AMAX=amax is not None, BLOCK_M=64, BLOCK_N=64)
    return out, out_t
