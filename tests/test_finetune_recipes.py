"""The fine-tune recipes (examples/configs/finetune/) and the memory claims of docs/finetuning.md: every recipe
loads, validates at its GPU count and fits 80 GB by the estimate at its largest bucket; the LoRA estimate counts
the adapters apply_lora builds and the activations a frozen block saves; the planner's answers hold."""

import glob
import os
import sys

import pytest
import torch

from megawan.config import LoRAConfig, dit_preset, load_config
from megawan.lora import apply_lora
from megawan.models.dit import WanDiT
from megawan.models.dit.flops import tokens as count_tokens
from megawan.training.memory import activation_bytes_per_block, estimate_run_memory, lora_params_per_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from plan_parallel import GB, latent_size, plan  # noqa: E402
from test_plan_parallel import saved_activation_bytes  # noqa: E402

RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "finetune", "*.yaml")))
LORA = LoRAConfig(rank=32, alpha=32, targets=("q", "k", "v", "o", "ffn.0", "ffn.2"))


def test_there_is_a_full_and_a_lora_recipe_for_every_official_model():
    names = {os.path.basename(p)[:-5] for p in RECIPES}
    for model in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.2-ti2v-5b"):
        assert {f"{model}_full", f"{model}_lora"} <= names
    assert {f"wan2.2-t2v-a14b_{kind}_{expert}" for kind in ("full", "lora") for expert in ("high", "low")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p)[:-5])
def test_recipe_loads_validates_and_fits_80gb(path):
    cfg = load_config(path)
    lora = "_lora" in os.path.basename(path)
    gpus = 1 if lora else 8
    cfg.validate(gpus)
    assert cfg.lora.enabled == lora and cfg.checkpoint.init_from  # every recipe starts from a converted release
    assert cfg.optimizer.lr == (1e-4 if lora else 1e-5)
    assert cfg.data.global_batch_size % cfg.parallel.data_parallel(gpus) == 0
    expert = cfg.train.expert
    assert (expert is not None) == (cfg.model.expert_boundary is not None)
    if expert:
        assert cfg.checkpoint.init_from.endswith(f"{expert}_noise_model")
    largest = max(cfg.data.buckets, key=lambda b: count_tokens(cfg.model, *latent_size(
        cfg.model.name, *(int(v) for v in b.split("x")))))
    tokens = count_tokens(cfg.model, *latent_size(cfg.model.name, *(int(v) for v in largest.split("x"))))
    est = estimate_run_memory(cfg, gpus, tokens)
    assert est.total <= 0.9 * 80 * GB, (path, est)
    if cfg.train.memory_budget_gb:
        assert est.total / GB < cfg.train.memory_budget_gb
    if lora:  # only the adapters train: grads and optimizer state are theirs
        assert est.trainable_params == cfg.model.num_layers * lora_params_per_block(cfg.model, cfg.lora)
        assert est.grads == est.trainable_params * 4 and est.trainable_params < est.params_per_gpu // 20


@pytest.mark.parametrize("tp", [1, 2])
def test_adapter_count_is_what_apply_lora_builds(tp):
    """lora_params_per_block = the adapters apply_lora puts on a (tiny, TP1) block; at TP2 the split side halves."""
    cfg = dit_preset("tiny-i2v", dim=64, ffn_dim=160, num_heads=4)
    lora = LoRAConfig(rank=4)
    model = WanDiT(cfg)
    params = apply_lora(model, rank=4)
    whole = sum(p.numel() for p in params) // cfg.num_layers
    assert lora_params_per_block(cfg, lora) == whole
    d, f, r = cfg.dim, cfg.ffn_dim, 4
    # column: q k v (x2), k_img, v_img: A whole, B split; fc1 too; row: o (x2), fc2: A split, B whole
    split = 8 * (r * d + r * d // tp) + (r * d + r * f // tp) + 2 * (r * d // tp + r * d) + (r * f // tp + r * d)
    assert lora_params_per_block(cfg, lora, tp) == split


@pytest.mark.parametrize("dtype,param_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("dim,ffn,heads,tokens,text_len", [(64, 160, 4, 96, 24), (96, 256, 8, 200, 40)])
def test_lora_activation_estimate_matches_a_frozen_block(dtype, param_bytes, dim, ffn, heads, tokens, text_len):
    """Every linear adapted: within 5% of what the frozen block saves; fewer targets: an upper bound (a frozen
    linear without an adapter saves no input of its own)."""
    cfg = dit_preset("tiny", dim=dim, ffn_dim=ffn, num_heads=heads, text_len=text_len,
                     params_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    for targets, close in ((None, True), (("q", "k", "v", "o"), False)):
        model = WanDiT(cfg)
        apply_lora(model, rank=4, targets=targets)
        measured = saved_activation_bytes(model, tokens, text_len, dtype)
        estimate = activation_bytes_per_block(cfg, tokens, text_len, param_bytes=param_bytes,
                                              lora=LoRAConfig(rank=4, targets=targets))
        assert (abs(estimate - measured) / measured < 0.05) if close else measured <= estimate, (targets, estimate,
                                                                                                measured)
    full = activation_bytes_per_block(cfg, tokens, text_len, param_bytes=param_bytes)
    assert estimate < full  # a frozen block saves less than a trained one


def _fits(preset, frames, height, width, gpus, gb, lora):
    _, _, fits, _ = plan(preset, frames, height, width, gpus, gb, lora=lora)
    return fits


def test_docs_claims_14b_lora_fits_one_80gb_gpu_with_recompute_and_full_does_not():
    fits = _fits("wan2.1-t2v-14b", 81, 480, 832, 1, 80, LORA)
    assert [(p.tensor_parallel, p.recompute) for p, _, _ in fits] == [(1, "full")]
    assert 45 * GB < fits[0][1].total < 55 * GB
    assert not _fits("wan2.1-t2v-14b", 81, 480, 832, 1, 80, None)
    assert not _fits("wan2.1-t2v-14b", 81, 480, 832, 1, 48, LORA)
    assert not _fits("wan2.1-t2v-14b", 81, 720, 1280, 1, 80, LORA)  # 720p: two GPUs (TP2 or CP2)
    assert _fits("wan2.1-t2v-14b", 81, 720, 1280, 2, 80, LORA)
    assert _fits("wan2.2-t2v-a14b", 81, 480, 832, 1, 80, LORA) and _fits("wan2.1-i2v-14b", 81, 480, 832, 1, 80, LORA)
    full8 = _fits("wan2.1-t2v-14b", 81, 480, 832, 8, 80, None)
    assert (full8[0][0].tensor_parallel, full8[0][0].recompute) == (4, "full")


def test_docs_claims_small_models_on_24_and_48gb():
    assert _fits("wan2.1-t2v-1.3b", 81, 480, 832, 1, 24, LORA)
    assert not _fits("wan2.1-t2v-1.3b", 81, 480, 832, 1, 24, None)
    assert _fits("wan2.1-t2v-1.3b", 81, 480, 832, 1, 48, None)
    assert _fits("wan2.2-ti2v-5b", 121, 704, 1280, 1, 24, LORA)
    assert not _fits("wan2.2-ti2v-5b", 121, 704, 1280, 1, 80, None)


def test_planner_prints_the_lora_plan(capsys):
    from plan_parallel import main

    assert main(["--config", os.path.join(ROOT, "examples", "configs", "finetune", "wan2.1-t2v-14b_lora.yaml"),
                 "--frames", "81", "--height", "480", "--width", "832", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 32, 153.4M adapter params" in out and "1 of 2 layouts fit" in out
    assert main(["--preset", "wan2.1-t2v-14b", "--height", "480", "--width", "832", "--gpus", "1",
                 "--lora-rank", "0"]) == 1
