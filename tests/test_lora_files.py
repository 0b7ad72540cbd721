"""LoRA files that load everywhere: a tiny model's adapters written in diffusers' and ComfyUI's layouts sample in
diffusers' WanPipeline (load_lora_weights) the latents `megawan generate --lora` samples (one rank and TP2, and
a LoRA training checkpoint given as --ckpt); read back they are the same tensors; merging adds scale alpha / rank
B A (in the model, in a state dict, in convert_checkpoint --merge-lora); files that do not fit are refused in one
line naming the key."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from megawan.lora import (LoRAFileError, apply_lora, export_lora, load_lora, merge_adapters, merge_lora_file,
                          read_lora_file, write_lora_file)
from megawan.parallel.launch import spawn_local
from pipelines import make_pipelines_in_three_layouts
from test_generate import PROMPTS, _generate, _rel, _request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402  (tools/ is not a package)

pytest.importorskip("peft")
RANK, ALPHA = 4, 8.0


def _lora_run(rank, pipeline, root):
    """What a LoRA run leaves (until the trainer writes its own): the pipeline's DiT with rank-4 adapters (alpha 8,
    B random so that they change the samples), saved as a checkpoint whose trainer state names its base, and the
    adapters exported as files in both layouts."""
    from megawan.artifacts import load_dit, resolve_model
    from megawan.checkpoint import save_model_checkpoint
    from megawan.config import config_to_dict

    found = resolve_model(pipeline)
    model = load_dit(found["experts"]["transformer"], found["config"])
    apply_lora(model, RANK, ALPHA, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2 and p.shape[1] == RANK:  # every lora_B
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    for fmt in ("diffusers", "comfyui"):
        assert export_lora(model, os.path.join(root, f"{fmt}.safetensors"), fmt) is not None
    config = {"model": config_to_dict(found["config"]), "lora": {"rank": RANK, "alpha": ALPHA}}
    state = {"step": 3, "lora_base": {"path": found["experts"]["transformer"], "fingerprint": ""}}
    save_model_checkpoint(os.path.join(root, "lora_ckpt"), [model], config, state)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    make_pipelines_in_three_layouts(root)
    spawn_local(_lora_run, world_size=1, args=(str(root / "megawan"), str(root)))
    return root


def _diffusers_latents(made, lora_file, noise):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    class WanGridUniPC(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    pipe = WanPipeline.from_pretrained(str(made / "diffusers"))
    pipe.scheduler = WanGridUniPC.from_config(pipe.scheduler.config, flow_shift=3.0)
    pipe.load_lora_weights(str(lora_file))
    return pipe(prompt=PROMPTS[0], negative_prompt="a blurry still frame", height=32, width=48, num_frames=17,
                num_inference_steps=6, guidance_scale=4.0, latents=noise.clone(), output_type="latent",
                max_sequence_length=24).frames.float()


def test_diffusers_and_megawan_sample_the_same_with_either_file(made, tmp_path):
    noise = torch.randn(1, 4, 5, 4, 6, generator=torch.Generator().manual_seed(7))
    torch.save(noise, tmp_path / "noise.pt")
    theirs = {fmt: _diffusers_latents(made, made / f"{fmt}.safetensors", noise) for fmt in ("diffusers", "comfyui")}
    assert _rel(theirs["comfyui"], theirs["diffusers"]) < 1e-5  # diffusers folds ComfyUI's alpha into A and B
    # a LoRA run's checkpoint as --ckpt (its base loaded, the adapters merged), by the command line
    cmd = [sys.executable, "-m", "megawan.cli", "generate", "--ckpt", str(made / "lora_ckpt"), "--encoders",
           str(made / "megawan"), "--prompt", PROMPTS[0], "--negative-prompt", "a blurry still frame", "--frames",
           "17", "--height", "32", "--width", "48", "--steps", "6", "--shift", "3", "--guidance", "4", "--noise",
           str(tmp_path / "noise.pt"), "--save-latents", str(tmp_path / "ckpt.pt"), "--device", "cpu", "--out",
           str(tmp_path / "ckpt.mp4")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert _rel(torch.load(tmp_path / "ckpt.pt", weights_only=True), theirs["diffusers"]) < 1e-4
    # the ComfyUI file on the base pipeline under TP2 (each rank merges its shard)
    req = _request(made / "megawan", tmp_path, "tp2", prompts=PROMPTS[:1], noise=str(tmp_path / "noise.pt"),
                   loras=((str(made / "comfyui.safetensors"), 1.0),))
    assert _rel(_generate(req, world=2, tensor_parallel=2), theirs["comfyui"]) < 1e-4
    assert _rel(theirs["diffusers"], noise) > 0.1


def test_either_file_reads_back_as_the_trained_tensors(made, tmp_path):
    from megawan.export import read_lora_checkpoint

    trained = read_lora_checkpoint(str(made / "lora_ckpt"))
    assert len(trained) == 2 * 10  # every linear of both blocks
    for fmt in ("diffusers", "comfyui"):
        got = read_lora_file(made / f"{fmt}.safetensors")
        assert list(got) == list(trained)
        for name, t in trained.items():
            assert torch.equal(got[name].A, t.A) and torch.equal(got[name].B, t.B) and got[name].alpha == ALPHA
    # the command line's --lora-out writes the same file from the checkpoint
    assert convert_main(["--src", str(made / "lora_ckpt"), "--src-format", "megawan", "--lora-out",
                         str(tmp_path / "out.safetensors"), "--lora-format", "comfyui"]) == 0
    again = read_lora_file(tmp_path / "out.safetensors")
    assert all(torch.equal(again[n].B, t.B) and again[n].alpha == ALPHA for n, t in trained.items())
    # peft's layout without the transformer. prefix, lora_A / lora_B under diffusion_model., per-linear alpha
    name = "blocks.1.mlp.linear_fc2"
    t = trained[name]
    for prefix, a, b in (("", "lora_A", "lora_B"), ("diffusion_model.", "lora_A", "lora_B")):
        stem = prefix + ("blocks.1.ffn.net.2" if not prefix else "blocks.1.ffn.2")
        save_file({f"{stem}.{a}.weight": t.A, f"{stem}.{b}.weight": t.B, f"{stem}.alpha": torch.tensor(2.0)},
                  tmp_path / "x.safetensors")
        x = read_lora_file(tmp_path / "x.safetensors")
        assert list(x) == [name] and torch.equal(x[name].A, t.A) and x[name].alpha == 2.0


def _tiny():
    from megawan.config import dit_preset
    from megawan.models.dit.model import WanDiT
    from pipelines import TINY_T2V

    return WanDiT(dit_preset("tiny", **TINY_T2V), init_seed=0)


def test_merging_adds_scale_alpha_over_rank_b_a(made, tmp_path):
    lora = read_lora_file(made / "diffusers.safetensors")
    model = _tiny()
    base = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    merged = merge_lora_file({k: v.clone() for k, v in base.items()}, lora, scale=0.5)
    name = "blocks.0.cross_attention.linear_k"
    t = lora[name]
    expect = base[name + ".weight"] + 0.5 * ALPHA / RANK * t.B @ t.A
    assert torch.allclose(merged[name + ".weight"], expect, atol=1e-6)
    assert torch.equal(merged["blocks.0.modulation"], base["blocks.0.modulation"])
    # load_lora + merge_adapters on the model: the same weights (and the adapters, before merging, the file's)
    assert len(load_lora(model, made / "comfyui.safetensors", scale=0.5)) == 20
    assert torch.equal(model.blocks[0].cross_attention.linear_k_lora.lora_B, t.B)
    assert merge_adapters(model) == 20
    for key, value in merged.items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key
    # a model with adapters already (a run continuing from a file) gets them filled, not new ones
    again = _tiny()
    apply_lora(again, RANK, 1.0)
    load_lora(again, made / "diffusers.safetensors")
    adapter = again.blocks[1].mlp.linear_fc1_lora
    assert torch.equal(adapter.lora_A, lora["blocks.1.mlp.linear_fc1"].A) and adapter.alpha == ALPHA
    # convert_checkpoint --merge-lora: the converted weights are merged
    from megawan.convert import SafetensorsDir, convert_state_dict
    from megawan.config import dit_preset
    from pipelines import TINY_T2V

    assert convert_main(["--src", str(made / "official"), "--src-format", "official", "--dst", str(tmp_path / "d"),
                         "--dst-format", "diffusers", "--merge-lora", f"{made / 'comfyui.safetensors'}:0.5"]) == 0
    src = SafetensorsDir(str(made / "official"))
    official = {k: src.get(k) for k in src.keys()}
    cfg = dit_preset("tiny", **TINY_T2V)
    want = merge_lora_file(convert_state_dict(official, "official", "megawan", cfg), lora, 0.5)
    out = SafetensorsDir(str(tmp_path / "d" / "transformer"))
    got = convert_state_dict({k: out.get(k) for k in out.keys()}, "diffusers", "megawan", cfg)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_files_that_do_not_fit_are_refused_naming_the_key(made, tmp_path, capsys):
    lora = read_lora_file(made / "diffusers.safetensors")
    t = lora["blocks.0.self_attention.linear_q"]
    bad = tmp_path / "bad.safetensors"

    def refused(tensors, match, call=None):
        save_file(tensors, bad)
        with pytest.raises(LoRAFileError, match=match):
            (call or (lambda: load_lora(_tiny(), bad)))()

    refused({"transformer.blocks.0.norm2.lora_A.weight": t.A}, "key 'transformer.blocks.0.norm2.lora_A.weight' "
            "matches no linear of a Wan block")
    refused({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": t.A,
             "diffusion_model.blocks.7.self_attn.q.lora_up.weight": t.B}, "'diffusion_model.blocks.7.self_attn.q."
            "lora_down.weight' matches no module: the model has 2 blocks")
    refused({"transformer.blocks.0.attn2.add_k_proj.lora_A.weight": t.A,  # an I2V LoRA on a T2V model
             "transformer.blocks.0.attn2.add_k_proj.lora_B.weight": t.B}, "add_k_proj.lora_A.weight' matches no "
            "module of tiny")
    wide = torch.zeros(RANK, 64)
    refused({"transformer.blocks.0.attn1.to_q.lora_A.weight": wide, "transformer.blocks.0.attn1.to_q.lora_B.weight":
             t.B}, "to_q.lora_A.weight' takes 64 in-features, but blocks.0.self_attention.linear_q of the model takes "
            "32")
    model = _tiny()
    apply_lora(model, 2)
    with pytest.raises(LoRAFileError, match="to_q.lora_A.weight' has rank 4, but the model's adapter on "
                                            "blocks.0.self_attention.linear_q has rank 2"):
        load_lora(model, made / "diffusers.safetensors")
    base = dict(_tiny().state_dict())
    base["blocks.1.mlp.linear_fc1.weight"] = torch.zeros(48, 32)
    with pytest.raises(LoRAFileError, match="the lora_B of 'transformer.blocks.1.ffn.net.0.proj.lora_A.weight' "
                                            "gives 64 out-features, but blocks.1.mlp.linear_fc1 of the base weights "
                                            "gives 48"):
        merge_lora_file(base, lora)
    with pytest.raises(LoRAFileError, match="no LoRA tensors to write"):
        write_lora_file({}, 1.0, tmp_path / "empty.safetensors")
    # the command line: one line, exit 2, before any process group
    from megawan.cli import main

    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": wide,
               "transformer.blocks.0.attn1.to_q.lora_B.weight": t.B}, bad)
    assert main(["generate", "--ckpt", str(made / "megawan"), "--prompt", "x", "--lora", f"{bad}:0.7"]) == 2
    assert capsys.readouterr().err == (f"megawan generate: {bad}: key 'transformer.blocks.0.attn1.to_q.lora_A.weight'"
                                       " takes 64 in-features, but blocks.0.self_attention.linear_q of official takes "
                                       "32 (a LoRA for another model size?)\n")
