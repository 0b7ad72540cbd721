"""LoRA adapters on one rank: what apply_lora adds and freezes, which linears the targets select (in any of the
three namings), that a zero B changes nothing, that recompute and FP8 base products leave the adapters'
training intact, that pipeline chunks start from the adapters of the whole model, and that merging equals
base + scale·B·A."""

import pytest
import torch

from megawan.config import dit_preset
from megawan.lora import adapters, apply_lora, lora_parameters, merge_adapters
from megawan.lora.targets import select_linears
from megawan.models.dit import WanDiT
from megawan.models.dit.fp8_linear import local_fp8
from megawan.models.dit.parallelize import apply_activation_recompute
from wan_reference import random_inputs


def _model(preset="tiny-i2v", seed=0, **overrides):
    torch.manual_seed(seed)
    model = WanDiT(dit_preset(preset, **overrides), init_seed=11)
    torch.nn.init.normal_(model.head.linear.weight, std=0.2)  # a non-zero head: the output depends on the blocks
    return model


def _run(model, inputs):
    latents, t, text, image = inputs
    out = model(latents, t, text, image=image)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach()


def _perturb(model, std=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in adapters(model):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * std)


def test_apply_lora_adds_adapters_freezes_the_base_and_starts_as_a_no_op():
    model = _model()
    inputs = random_inputs(model.dit_config, frames=3, height=4, width=6)
    # megatron's parallel linears run a frozen weight through their own function (linear_with_frozen_weight), whose
    # rounding can differ from the trainable path's in the last bit on some CPUs: compare like with like
    model.requires_grad_(False)
    with torch.no_grad():
        before = model(*inputs[:3], image=inputs[3])
    model.requires_grad_(True)
    params = apply_lora(model, rank=4, alpha=8)
    # 2 blocks x (4 self-attention + 4 cross-attention + k_img, v_img + 2 FFN) linears, A and B each
    assert len(params) == 2 * 12 * 2 and {id(p) for p in params} == {id(p) for p in lora_parameters(model)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "_lora.lora_" in n} and len(trainable) == 48
    a = dict(adapters(model))["blocks.1.mlp.linear_fc1"]
    assert a.lora_A.shape == (4, 32) and a.lora_B.shape == (model.dit_config.ffn_dim, 4) and a.scale == 2.0
    assert not a.lora_B.any() and 0.15 < a.lora_A.std().item() < 0.35  # peft's gaussian init: N(0, 1/rank), B = 0
    assert torch.equal(_run(model, inputs), before)  # B = 0: the model is unchanged ...
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(a.lora_B.grad.abs().sum() > 0 for _, a in adapters(model))  # ... and B learns first, as in peft


@pytest.mark.parametrize("targets,expected", [
    (["q", "v"], ["self_attention.linear_q", "self_attention.linear_v", "cross_attention.linear_q",
                  "cross_attention.linear_v"]),
    (["self_attn.o", "ffn.0"], ["self_attention.linear_proj", "mlp.linear_fc1"]),  # official (ComfyUI) names
    (["attn2.to_k", "add_v_proj"], ["cross_attention.linear_k", "cross_attention.linear_v_img"]),  # diffusers
    (["mlp.linear_fc2"], ["mlp.linear_fc2"]),  # megawan
])
def test_targets_select_linears_by_any_of_their_names(targets, expected):
    assert select_linears(targets) == expected


def test_a_target_that_names_no_linear_is_refused_naming_it():
    with pytest.raises(ValueError, match="'qkv' names no linear"):
        select_linears(["q", "qkv"])
    model = _model("tiny")  # a text-to-video model has no image branch: k_img names nothing there
    with pytest.raises(ValueError, match="'k_img' names no linear"):
        apply_lora(model, rank=2, targets=["k_img"])


def test_recompute_and_fp8_base_products_keep_the_adapters_training():
    inputs = random_inputs(dit_preset("tiny-i2v"), frames=3, height=4, width=6)
    runs = {}
    for name in ("plain", "recompute", "fp8"):
        model = _model()
        apply_lora(model, rank=4)
        _perturb(model)
        if name == "recompute":
            apply_activation_recompute(model, "full", 1)
        with local_fp8(enabled=name == "fp8"):
            out = _run(model, inputs)
        runs[name] = out, {n: a.lora_A.grad.clone() for n, a in adapters(model)}
    out0, grads0 = runs["plain"]
    assert torch.equal(runs["recompute"][0], out0)
    assert all(torch.equal(runs["recompute"][1][n], g) for n, g in grads0.items())
    out8, grads8 = runs["fp8"]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 0 < rel(out8, out0) < 0.08  # the base products really ran in FP8 ...
    assert max(rel(grads8[n], g) for n, g in grads0.items()) < 0.15  # ... and the adapters' gradients follow


def test_pipeline_chunks_start_from_the_whole_models_adapters():
    whole = _model(num_layers=2)
    apply_lora(whole, rank=4)
    second = WanDiT(dit_preset("tiny-i2v", num_layers=2), layers=range(1, 2), pre_process=False, init_seed=11)
    apply_lora(second, rank=4)
    ours, theirs = dict(adapters(whole)), dict(adapters(second))
    assert list(theirs) == [n for n in ours if n.startswith("blocks.1.")]
    assert all(torch.equal(theirs[n].lora_A, ours[n].lora_A) for n in theirs)


def test_merging_folds_scale_B_A_into_the_weights_and_removes_the_adapters():
    model = _model()
    inputs = random_inputs(model.dit_config, frames=3, height=4, width=6)
    apply_lora(model, rank=4, alpha=2)
    _perturb(model)
    with torch.no_grad():
        adapted = model(*inputs[:3], image=inputs[3])
    a = dict(adapters(model))["blocks.0.cross_attention.linear_k_img"]
    linear = model.blocks[0].cross_attention.linear_k_img
    expected = linear.weight + 0.5 * a.lora_B @ a.lora_A
    assert merge_adapters(model) == 24
    assert torch.allclose(linear.weight, expected, atol=1e-7)
    assert not list(adapters(model)) and not any("_lora" in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs[:3], image=inputs[3]), adapted, rtol=0, atol=1e-5)
