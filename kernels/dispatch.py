"""One place that decides between the Triton kernels and the torch references."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from kernels import reference


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runnable() -> bool:
    """Can the Triton kernels run here at all (a CUDA device, or the interpreter)?"""
    if os.environ.get("MEGAWAN_KERNELS") == "torch" or not _triton_importable():
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def triton_path(t: torch.Tensor) -> bool:
    """Use the Triton kernels for tensor t? MEGAWAN_KERNELS=torch forces the references, =triton the kernels
    (on CPU that needs TRITON_INTERPRET=1); by default kernels on CUDA tensors when Triton is there. Under
    torch.compile the references are traced instead: Inductor fuses them with their neighbours and generates
    their backward too (our kernels recompute the reference for the backward)."""
    choice = os.environ.get("MEGAWAN_KERNELS", "auto")
    if choice == "torch" or not _triton_importable():
        return False
    if torch.compiler.is_compiling():  # under torch.compile the references fuse, backward included
        return False
    if choice == "triton":
        return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return t.is_cuda


class _Fused(torch.autograd.Function):
    """A Triton forward with the reference's backward: the backward recomputes the reference (cheap, elementwise
    and norms) under autograd, so training through the kernels needs no hand-written gradients."""

    @staticmethod
    def forward(ctx, name, fused, ref, extra, *tensors):
        ctx.ref, ctx.extra = ref, extra
        ctx.save_for_backward(*tensors)
        return fused(*tensors, *extra)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.ref(*inputs, *ctx.extra)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return (None, None, None, None, *[next(grads) if t.requires_grad else None for t in inputs])


def modulate(x, scale, shift, eps: float):
    if triton_path(x):
        from kernels.modulation import modulate_triton

        return _Fused.apply("modulate", modulate_triton, reference.modulate, (eps,), x, scale, shift)
    return reference.modulate(x, scale, shift, eps)


def gated_residual(x, y, gate):
    if triton_path(x):
        from kernels.modulation import gated_residual_triton

        return _Fused.apply("gated_residual", gated_residual_triton, reference.gated_residual, (), x, y, gate)
    return reference.gated_residual(x, y, gate)


def qk_norm_rope(x, weight, cos, sin, heads: int, eps: float):
    if triton_path(x):
        from kernels.rmsnorm_rope import qk_norm_rope_triton

        return _Fused.apply("qk_norm_rope", qk_norm_rope_triton, reference.qk_norm_rope, (heads, eps), x, weight,
                            cos, sin)
    return reference.qk_norm_rope(x, weight, cos, sin, heads, eps)


def fp8_attention(q, k, v, scale=None):
    """Bidirectional attention with FP8 products (kernels/fp8_flash_attention.py): q [b, h, s_q, d], k / v [b, h, s_k, d].
    A Triton kernel only: there is no torch FP8 attention to fall back to, so on CPU it runs whenever Triton's
    interpreter is on."""
    if not triton_runnable() or not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("FP8 attention (train.fp8_attention) is a Triton kernel: it needs Triton and a CUDA "
                           "device (on CPU, TRITON_INTERPRET=1 with MEGAWAN_KERNELS=triton)")
    from kernels.fp8_flash_attention import fp8_attention as fused

    return fused(q, k, v, scale)
