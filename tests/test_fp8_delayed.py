"""Delayed scaling on the local backend's FP8 linears (megawan/models/dit/fp8_linear.py): each tensor slot's scale
is finfo.max / the largest amax of its last `amax_history` passes (TE's DelayedScaling, algorithm "max"), the
first pass scaling by its own amax; and on the fused path (kernels/fp8_transpose.py's cast-and-transpose, here
through Triton's interpreter) the products are the torch path's, bit for bit."""

import pytest
import torch

from megawan.models.dit.fp8_linear import E4M3, E5M2, AmaxHistory, fp8_linear

TOP = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}


def _recipe_scale(amaxes: list, length: int, current: float, dtype) -> torch.Tensor:
    """The recipe, written out: max over the last `length` recorded amaxes (this pass's own before any), fp32."""
    return torch.tensor(TOP[dtype]) / torch.tensor(max(amaxes[-length:]) if amaxes else current)


def _dequant(t, scale, dtype):
    return (t.float() * scale).clamp(-TOP[dtype], TOP[dtype]).to(dtype).double() * scale.reciprocal().double()


def _close(a, b):
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_delayed_scaling_follows_the_max_of_the_amax_history():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    history, length = AmaxHistory(2, "cpu"), 2
    seen = {"x": [], "w": [], "g": []}
    for step, size in enumerate([1.0, 6.0, 0.3, 0.3, 2.0]):  # a jump (saturates), then a fall (coarser steps)
        x = (torch.randn(16, 40, generator=g) * size).requires_grad_()
        grad = torch.randn(16, 24, generator=g) * size * 1e-3
        y = fp8_linear(x, w, history=history)
        y.backward(grad)
        sx = _recipe_scale(seen["x"], length, x.abs().max().item(), E4M3)
        sw = _recipe_scale(seen["w"], length, w.abs().max().item(), E4M3)
        sg = _recipe_scale(seen["g"], length, grad.abs().max().item(), E5M2)
        qx, qw, qg = _dequant(x.detach(), sx, E4M3), _dequant(w.detach(), sw, E4M3), _dequant(grad, sg, E5M2)
        _close(y.detach(), qx @ qw.t())
        _close(x.grad, qg @ qw)
        _close(w.grad, qg.t() @ qx)
        w.grad = None
        if step == 1:  # the history (amax ~1) saturates this step's x (amax ~6): far from current scaling
            assert (y.detach() - x.detach() @ w.detach().t()).norm() > 0.2 * y.detach().norm()
        for name, t in (("x", x), ("w", w), ("g", grad)):
            seen[name].append(t.detach().abs().max().item())
    assert history.recorded == [5, 5, 5]
    with torch.no_grad():  # a forward without a graph (inference, or a recomputed block's first pass) records nothing
        fp8_linear(x, w, history=history)
    assert history.recorded == [5, 5, 5]
    last_two = [sorted(seen[name][-2:]) for name in ("x", "w", "g")]  # a ring: the 5th pass overwrote the 3rd's
    assert torch.allclose(history.amax.sort(dim=1).values, torch.tensor(last_two))


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_the_fused_cast_transpose_path_equals_the_torch_path(recipe, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("MEGAWAN_KERNELS", mode)
        g = torch.Generator().manual_seed(1)
        w = torch.randn(50, 70, generator=g).to(device).requires_grad_()  # odd sizes: masked tails
        history = AmaxHistory(3, device) if recipe == "delayed" else None
        outs = []
        for size in (1.0, 3.0, 0.5):
            x = (torch.randn(37, 70, generator=g) * size).to(device).requires_grad_()
            y = fp8_linear(x, w, history=history)
            y.backward((torch.randn(37, 50, generator=g) * 1e-2).to(device))
            outs += [y.detach(), x.grad, w.grad.clone()]
            w.grad = None
        results[mode] = outs
    for a, b in zip(results["torch"], results["triton"]):
        assert torch.equal(a, b)


def test_a_recomputed_block_casts_with_its_forwards_scales():
    """Activation recompute (torch's non-reentrant checkpoint, megawan's recompute) re-runs the forward inside the
    backward: it must quantise as the forward did, although the forward has recorded a larger amax since."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    xs = [torch.randn(16, 40, generator=g) * size for size in (1.0, 5.0, 25.0)]  # every step's amax a new high
    grads = {}
    for recompute in (False, True):
        history = AmaxHistory(4, "cpu")
        grads[recompute] = []
        for x in xs:
            x = x.clone().requires_grad_()
            if recompute:
                y = checkpoint(fp8_linear, x, w, None, history, use_reentrant=False)
            else:
                y = fp8_linear(x, w, history=history)
            y.square().sum().backward()
            grads[recompute] += [x.grad, w.grad.clone()]
            w.grad = None
        assert history.recorded == [3, 3, 3]  # one record per step, the recompute's not counted
        assert not recompute or not history.used[0]  # each recompute took its forward's scale
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
