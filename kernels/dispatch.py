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


MODES = ("auto", "triton", "compile", "torch")


def kernel_mode(t: torch.Tensor) -> str:
    """How the fusable pieces of the block (modulated LayerNorm, gated residual, q/k norm + RoPE, FP8 casts)
    run for tensor t: "triton" (our kernels, forward and backward), "compile" (the references through
    torch.compile: Inductor fuses forward and backward) or "torch" (the references, eager).

    MEGAWAN_KERNELS picks one; auto = triton on CUDA, torch elsewhere. triton on CPU needs TRITON_INTERPRET=1.
    Inside a torch.compile'd region everything is "torch": the caller's compile fuses it.

    "compile" is opt-in (docs/kernels.md): every compile here takes `compile_kwargs`, which turn off the
    Inductor pass that broke it on an H100 (docs/benchmarks.md)."""
    choice = os.environ.get("MEGAWAN_KERNELS", "auto")
    if choice not in MODES:
        raise ValueError(f"MEGAWAN_KERNELS={choice!r} is not one of {', '.join(MODES)}")
    if choice == "torch" or torch.compiler.is_compiling():
        return "torch"
    if choice == "compile":
        return "compile"
    if choice == "triton":
        ok = _triton_importable() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        return "triton" if ok else "torch"
    return "triton" if t.is_cuda and _triton_importable() else "torch"


def fused_path(t: torch.Tensor) -> bool:
    """Does the block hand its fusable pieces to this module (our kernels or compiled references)?"""
    return kernel_mode(t) != "torch"


def inductor_options() -> dict:
    """Inductor settings for every torch.compile megawan does: mix-order reduction off where torch has it.

    That pass (default on since torch 2.10, CUDA / Triton only) fuses LayerNorm's row reductions with the
    column sums that give a broadcast modulation input its gradient, and it got Wan's modulated LayerNorm wrong:
    - torch 2.10 / 2.11: the column sum lost its keepdim, so a [1, 1, D] scale / shift (a batch-1 step) got a
      [D] gradient: "CompiledFunctionBackward returned an invalid gradient ... got [5120] but expected shape
      compatible with [1, 1, 5120]" (our H100 run; pytorch/pytorch#178080, fixed by #177782 / #178098);
    - torch 2.10 to 2.13: when the six modulation vectors are slices of one table (Wan's `modulation` + e0,
      unbound), the sums written into the table's gradient were dropped: silently wrong gradients past ~16k
      tokens (pytorch/pytorch#193061, fixed by #193103).
    Without the pass Inductor still fuses each reduction with its pointwise neighbours."""
    from torch._inductor import config as inductor_config

    return {"triton.mix_order_reduction": False} if hasattr(inductor_config.triton, "mix_order_reduction") else {}


def compile_kwargs(backend: str = "inductor", fullgraph: bool = False) -> dict:
    """torch.compile's (or Module.compile's) arguments with `inductor_options` (other backends, e.g. the tests'
    aot_eager, take no options)."""
    options = inductor_options() if backend == "inductor" else {}
    return dict(backend=backend, fullgraph=fullgraph, options=options or None)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """fn through torch.compile (one compiled function per reference, reused by every block; a second shape
    makes it shape-generic rather than compiling again per shape)."""
    return torch.compile(fn, **compile_kwargs())


class _Modulate(torch.autograd.Function):
    """Triton forward and backward of the modulated LayerNorm (kernels/modulation.py)."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        from kernels.modulation import modulate_triton  # Triton: an optional dependency

        ctx.save_for_backward(x, scale)
        ctx.eps, ctx.shift_shape = eps, (shift.shape, shift.dtype)
        return modulate_triton(x, scale, shift, eps)

    @staticmethod
    def backward(ctx, grad):
        from kernels.modulation import modulate_backward_triton  # Triton: an optional dependency

        x, scale = ctx.saved_tensors
        shape, dtype = ctx.shift_shape
        shift = torch.empty(shape, dtype=dtype, device="meta")  # only its shape and dtype are read: no memory
        dx, dscale, dshift = modulate_backward_triton(x, scale, shift, grad, ctx.eps)
        return dx, dscale, dshift, None


class _GatedResidual(torch.autograd.Function):
    """Triton forward and backward of x + y · gate (kernels/modulation.py)."""

    @staticmethod
    def forward(ctx, x, y, gate):
        from kernels.modulation import gated_residual_triton  # Triton: an optional dependency

        ctx.save_for_backward(y, gate)
        return gated_residual_triton(x, y, gate)

    @staticmethod
    def backward(ctx, grad):
        from kernels.modulation import gated_residual_backward_triton  # Triton: an optional dependency

        y, gate = ctx.saved_tensors
        return gated_residual_backward_triton(y, gate, grad)


class _QKNormRope(torch.autograd.Function):
    """Triton forward and backward of the q/k RMSNorm + 3D RoPE (kernels/rmsnorm_rope.py); the RoPE tables are
    constants (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, heads, eps):
        from kernels.rmsnorm_rope import qk_norm_rope_triton  # Triton: an optional dependency

        if cos.requires_grad or sin.requires_grad:
            raise ValueError("qk_norm_rope: the RoPE tables must not require gradients")
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.heads, ctx.eps = heads, eps
        return qk_norm_rope_triton(x, weight, cos, sin, heads, eps)

    @staticmethod
    def backward(ctx, grad):
        from kernels.rmsnorm_rope import qk_norm_rope_backward_triton  # Triton: an optional dependency

        x, weight, cos, sin = ctx.saved_tensors
        dx, dweight = qk_norm_rope_backward_triton(x, weight, cos, sin, grad, ctx.heads, ctx.eps)
        return dx, dweight, None, None, None, None


def modulate(x, scale, shift, eps: float):
    mode = kernel_mode(x)
    if mode == "triton":
        return _Modulate.apply(x, scale, shift, eps)
    return (compiled(reference.modulate) if mode == "compile" else reference.modulate)(x, scale, shift, eps)


def gated_residual(x, y, gate):
    mode = kernel_mode(x)
    if mode == "triton":
        return _GatedResidual.apply(x, y, gate)
    return (compiled(reference.gated_residual) if mode == "compile" else reference.gated_residual)(x, y, gate)


def qk_norm_rope(x, weight, cos, sin, heads: int, eps: float):
    mode = kernel_mode(x)
    if mode == "triton":
        return _QKNormRope.apply(x, weight, cos, sin, heads, eps)
    fn = compiled(reference.qk_norm_rope) if mode == "compile" else reference.qk_norm_rope
    return fn(x, weight, cos, sin, heads, eps)


def quantize_fp8(t, dtype):
    """Per-tensor FP8 cast for the local backend's FP8 linears: the Triton cast (kernels/fp8_cast.py, two passes),
    the compiled reference, or the eager reference (five passes)."""
    mode = kernel_mode(t)
    if mode == "triton":
        from kernels.fp8_cast import quantize_fp8 as fused  # Triton: an optional dependency

        return fused(t, dtype)
    return (compiled(reference.quantize_fp8) if mode == "compile" else reference.quantize_fp8)(t, dtype)


def fp8_attention(q, k, v, scale=None):
    """Bidirectional attention with FP8 products (kernels/fp8_flash_attention.py): q [b, h, s_q, d], k / v [b, h, s_k, d].
    A Triton kernel only: there is no torch FP8 attention to fall back to, so on CPU it runs whenever Triton's
    interpreter is on."""
    if not triton_runnable() or not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("FP8 attention (train.fp8_attention) is a Triton kernel: it needs Triton and a CUDA "
                           "device (on CPU, Triton's interpreter: TRITON_INTERPRET=1)")
    from kernels.fp8_flash_attention import fp8_attention as fused  # Triton: an optional dependency

    return fused(q, k, v, scale)
