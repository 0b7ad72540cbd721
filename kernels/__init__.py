"""Triton kernels for what neither Transformer Engine nor torch fuses in a Wan block, each beside its pure-torch
reference (`kernels.reference`) and chosen by one dispatcher:

    from kernels import modulate, gated_residual, qk_norm_rope
    y = modulate(x, scale, shift, eps)            # LayerNorm(x) * (1 + scale) + shift, fp32 math
    x = gated_residual(x, y, gate)                # x + y * gate, fp32 math, x's dtype
    q = qk_norm_rope(q, weight, cos, sin, heads, eps)   # RMSNorm over the hidden, then 3D RoPE per head
    o = fp8_attention(q, k, v)                    # softmax(q kᵀ / √d) v, both products FP8 (no reference path)

The Triton path runs on CUDA tensors when Triton is installed (`megawan.capabilities`), or everywhere with
TRITON_INTERPRET=1 and MEGAWAN_KERNELS=triton (how the CPU tests run the kernels); else the reference runs.
"""

from kernels.dispatch import fp8_attention, gated_residual, modulate, qk_norm_rope, fused_path

__all__ = ["modulate", "gated_residual", "qk_norm_rope", "fp8_attention", "fused_path"]
