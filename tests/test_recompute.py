"""Activation recomputation changes no output and no gradient."""

import pytest
import torch

from megawan.config import dit_preset
from megawan.models.dit import WanDiT
from megawan.models.dit.parallelize import apply_activation_recompute
from wan_reference import random_inputs


def _grads(mode, every):
    torch.manual_seed(0)
    cfg = dit_preset("tiny-i2v", num_layers=3)
    model = WanDiT(cfg)
    torch.nn.init.normal_(model.head.linear.weight)  # a non-zero head, so every parameter gets a gradient
    apply_activation_recompute(model, mode, every)
    latents, t, text, image = random_inputs(cfg, per_token=False)
    out = model(latents, t, text, image=image)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("mode,every,attention_calls", [("full", 1, 18), ("full", 2, 15), ("selective", 1, 18)])
def test_recompute_changes_no_gradient(mode, every, attention_calls, monkeypatch):
    out0, grads0, _ = _grads("none", 1)
    # 3 blocks x 3 attentions (self, text, image) = 9 calls without recompute; recomputed ones run twice
    from megawan.models.dit import core_attention

    calls = []
    sdpa = core_attention.F.scaled_dot_product_attention
    monkeypatch.setattr(core_attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    out1, grads1, model = _grads(mode, every)
    assert len(calls) == attention_calls
    assert torch.equal(out0, out1)
    for name, g in grads0.items():
        assert torch.equal(g, grads1[name]), name
    assert [k for k in model.state_dict()] == [k for k in _grads("none", 1)[2].state_dict()]


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="recompute mode"):
        apply_activation_recompute(WanDiT(dit_preset("tiny")), "some")
