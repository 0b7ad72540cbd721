"""The Triton kernels against their torch references, on CPU through Triton's interpreter (TRITON_INTERPRET=1,
set before Triton is imported) and on a GPU when there is one. fp32: max|Δ| / max|ref| ≤ 1e-5; bf16:
‖Δ‖ / ‖ref‖ ≤ 1e-2 (the interpreter truncates bf16 casts instead of rounding, so single elements may be a
couple of ulps off)."""



import pytest
import torch

pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels.dispatch import fused_path, kernel_mode  # noqa: E402
from kernels.modulation import gated_residual_triton, modulate_triton  # noqa: E402
from kernels.rmsnorm_rope import qk_norm_rope_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _err(a, b, dtype):
    a, b = a.float(), b.float()
    if dtype == torch.bfloat16:
        return ((a - b).norm() / b.norm()).item()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
def test_modulate_and_gated_residual(dtype, per_token):
    g = torch.Generator().manual_seed(0)
    s, b, d = 6, 2, 48  # 48: not a power of two, the row is masked
    x = (torch.randn(s, b, d, generator=g) * 3 + 1).to(DEVICE, dtype)
    rows = s if per_token else 1
    scale, gate = (torch.randn(rows, b, d, generator=g).to(DEVICE) for _ in range(2))  # fp32, as Wan's e0
    shift = torch.randn(1, b, d, generator=g).to(DEVICE)  # broadcast differently from scale: its own strides
    got = modulate_triton(x, scale, shift, 1e-6)
    assert _err(got, reference.modulate(x, scale, shift, 1e-6), dtype) <= TOL[dtype]
    y = torch.randn(s, b, d, generator=g).to(DEVICE, dtype)
    assert _err(gated_residual_triton(x, y, gate), reference.gated_residual(x, y, gate), dtype) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matches_the_model_path(dtype):
    """The reference is what the model does today: ParallelRMSNorm then apply_rope with the 3D tables."""
    from megawan.models.dit.rope import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(1)
    heads, head_dim, grid = 2, 12, (2, 2, 3)
    s, b, hidden = 12, 2, heads * head_dim
    x = torch.randn(s, b, hidden, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    split = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    cos, sin = rope_cos_sin(grid, split, device=DEVICE)
    cos2, sin2 = cos[:, 0, 0], sin[:, 0, 0]
    ref = reference.qk_norm_rope(x, w, cos2, sin2, heads, 1e-6)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(dtype)
    model = apply_rope(normed.unflatten(-1, (heads, -1)), cos, sin)
    assert _err(ref, model, dtype) <= TOL[dtype]
    assert _err(qk_norm_rope_triton(x, w, cos2, sin2, heads, 1e-6), ref, dtype) <= TOL[dtype]


def _grads(fn, inputs, dout):
    """Gradients of <fn(*inputs), dout> with respect to the inputs that require them."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("rows", [None, 8])
def test_backward_kernels_equal_the_references_gradients(dtype, per_token, rows):
    """The Triton backward of each fused piece against autograd through its torch reference. 70 tokens; with 8
    rows per program the last program is partial and the per-sample modulation (and RMSNorm weight) gradients
    are sums of several programs' partial rows."""
    from kernels.modulation import gated_residual_backward_triton, modulate_backward_triton
    from kernels.rmsnorm_rope import qk_norm_rope_backward_triton

    g = torch.Generator().manual_seed(5)
    s, b, d = 70, 2, 48
    rows = s if per_token else 1
    x = (torch.randn(s, b, d, generator=g) * 3 + 1).to(DEVICE, dtype)
    scale, shift, gate = (torch.randn(rows, b, d, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    shift = shift[:1].detach().requires_grad_()  # per sample while scale may be per token
    x.requires_grad_()
    dout = torch.randn(s, b, d, generator=g).to(DEVICE, dtype)
    ref = _grads(lambda *a: reference.modulate(*a, 1e-6), (x, scale, shift), dout)
    got = modulate_backward_triton(x.detach(), scale.detach(), shift.detach(), dout, 1e-6, rows)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert _err(a, r, dtype) <= TOL[dtype], _err(a, r, dtype)

    y = torch.randn(s, b, d, generator=g).to(DEVICE, dtype).requires_grad_()
    ref = _grads(reference.gated_residual, (x, y, gate), dout)
    got = gated_residual_backward_triton(y.detach(), gate.detach(), dout, rows)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert _err(a, r, dtype) <= TOL[dtype], _err(a, r, dtype)

    heads, half = 4, 3  # head_dim 6 = 2 x half: hidden 24
    xq = torch.randn(s, b, heads * 2 * half, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(heads * 2 * half, generator=g)).to(DEVICE, dtype).requires_grad_()
    angles = torch.rand(s, half, generator=g).to(DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    dq = torch.randn(s, b, heads, 2 * half, generator=g).to(DEVICE, dtype)
    ref = _grads(lambda a, b_: reference.qk_norm_rope(a, b_, cos, sin, heads, 1e-6), (xq, w), dq)
    got = qk_norm_rope_backward_triton(xq.detach(), w.detach(), cos, sin, dq, heads, 1e-6, rows)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert _err(a, r, dtype) <= TOL[dtype], _err(a, r, dtype)


def test_gradients_flow_through_the_dispatched_kernels(monkeypatch):
    """The dispatcher's Triton path trains: its forward and backward kernels give the torch path's gradients."""
    import kernels

    g = torch.Generator().manual_seed(2)
    x, scale, shift, gate = (torch.randn(4, 2, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(4))
    grads = {}
    for choice in ("triton", "torch"):
        monkeypatch.setenv("MEGAWAN_KERNELS", choice)
        for t in (x, scale, shift, gate):
            t.grad = None
        y = kernels.modulate(x, scale[:1], shift[:1], 1e-6)
        kernels.gated_residual(x, y, gate).square().sum().backward()
        grads[choice] = [t.grad.clone() for t in (x, scale, shift, gate)]
    for a, b in zip(grads["triton"], grads["torch"]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,batch", [(1, 1), (1, 3), (5, 3)])  # batch 1 ([1, 1, D]), per sample, per token
def test_every_backward_returns_its_inputs_shapes(dtype, rows, batch, monkeypatch):
    """Each custom Function's backward gives every input a gradient of exactly its shape and dtype: eager autograd
    sum_to's a larger gradient, but a compiled graph around these Functions (AOTAutograd) checks strictly, and a
    [D] gradient for a [1, 1, D] modulation is what failed on the H100 (docs/benchmarks.md)."""
    import kernels

    monkeypatch.setenv("MEGAWAN_KERNELS", "triton")
    g = torch.Generator().manual_seed(4)
    s, d, heads = 5, 16, 2
    x = torch.randn(s, batch, d, generator=g).to(DEVICE, dtype).requires_grad_()
    y = torch.randn(s, batch, d, generator=g).to(DEVICE, dtype).requires_grad_()
    scale, shift, gate = (torch.randn(rows, batch, d, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    w = torch.randn(d, generator=g).to(DEVICE, dtype).requires_grad_()
    cos, sin = torch.randn(2, s, d // heads // 2, generator=g).to(DEVICE)
    for out, inputs in [(kernels.modulate(x, scale, shift, 1e-6), (x, scale, shift)),
                        (kernels.gated_residual(x, y, gate), (x, y, gate)),
                        (kernels.qk_norm_rope(x, w, cos, sin, heads, 1e-6), (x, w))]:
        assert type(out.grad_fn).__name__.startswith("_"), "not our Function"  # e.g. _ModulateBackward
        grads = torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g).to(DEVICE, dtype))
        for t, grad in zip(inputs, grads):
            assert grad.shape == t.shape and grad.dtype == t.dtype, (type(out.grad_fn).__name__, t.shape, grad.shape)


def test_dispatch_follows_the_switch(monkeypatch):
    x = torch.zeros(1, device=DEVICE)
    monkeypatch.setenv("MEGAWAN_KERNELS", "torch")
    assert not fused_path(x)
    monkeypatch.setenv("MEGAWAN_KERNELS", "triton")
    assert fused_path(x)  # a CUDA tensor, or TRITON_INTERPRET=1 (CPU)
    monkeypatch.setenv("MEGAWAN_KERNELS", "auto")
    assert fused_path(x) == x.is_cuda
    assert kernel_mode(x) == ("triton" if x.is_cuda else "torch")
    monkeypatch.setenv("MEGAWAN_KERNELS", "compile")
    assert kernel_mode(x) == "compile"
    monkeypatch.setenv("MEGAWAN_KERNELS", "fast")
    with pytest.raises(ValueError, match="MEGAWAN_KERNELS"):
        kernel_mode(x)


def test_bad_broadcast_is_refused():
    x = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="scale"):
        modulate_triton(x, torch.zeros(3, 2, 8), torch.zeros(1, 2, 8), 1e-6)


def test_dit_block_with_kernels_equals_the_torch_path(monkeypatch):
    """The whole tiny DiT, forward and backward, with the fused kernels (interpreted) and without."""
    from megawan.config import dit_preset
    from megawan.models.dit import WanDiT

    torch.manual_seed(0)
    cfg = dit_preset("tiny-ti2v", in_dim=4, out_dim=4)  # per-token modulation: the strided broadcast case
    model = WanDiT(cfg).to(DEVICE).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # Wan zero-initialises the head: perturb every weight so the output is not 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(DEVICE))
    x = torch.randn(2, 4, 3, 4, 4, generator=g).to(DEVICE)
    t = (torch.rand(2, 3 * 2 * 2, generator=g) * 1000).to(DEVICE)
    text = torch.randn(2, 7, cfg.text_dim, generator=g).to(DEVICE)
    out = {}
    for choice in ("torch", "triton", "compile"):
        monkeypatch.setenv("MEGAWAN_KERNELS", choice)
        model.zero_grad()
        y = model(x, t, text)
        y.square().mean().backward()
        out[choice] = (y.detach(), [p.grad.clone() for p in model.parameters()])
    for fused in ("triton", "compile"):
        assert _err(out[fused][0], out["torch"][0], torch.float32) <= 1e-5
        for a, b in zip(out[fused][1], out["torch"][1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cast_equals_the_reference(fp8, dtype):
    """The FP8 linears' per-tensor cast (kernels/fp8_cast.py): the same scale as the reference, and on a GPU the
    same bytes; the interpreter rounds some values to the binade below (2-5 % of them here), so on CPU the
    dequantised error is only held within 4x the reference's."""
    from kernels.fp8_cast import quantize_fp8

    g = torch.Generator().manual_seed(4)
    t = (torch.randn(300, 70, generator=g) * 3).to(DEVICE, dtype)  # 21,000 values: several programs, a tail
    q, inv = quantize_fp8(t, fp8)
    ref_q, ref_inv = reference.quantize_fp8(t, fp8)
    assert q.dtype == fp8 and q.shape == t.shape
    assert torch.equal(inv, ref_inv)
    mismatched = (q.float() != ref_q.float()).float().mean().item()

    def error(x):
        return ((x.float() * inv - t.float()).norm() / t.float().norm()).item()

    if DEVICE == "cuda":
        assert mismatched == 0.0
    else:
        assert mismatched < 0.06 and error(q) < 4 * error(ref_q)
