"""`megawan generate`: the same latents on one rank, under TP2, CP2 and DP2; the same latents as diffusers'
WanPipeline given our exported pipeline, the same noise, prompt, sampler (UniPC on Wan's grid) and guidance;
TI2V keeps its first frame; A14B switches experts with a guidance scale per expert; the CLI writes an mp4."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megawan.export import convert_pipeline
from megawan.generation import GenerationRequest, run_generate
from megawan.parallel.launch import spawn_local
from pipelines import TINY_T2V, make_official_pipeline

pytest.importorskip("diffusers")
PROMPTS = ["a red circle moves left", "a blue square moves down"]


@pytest.fixture(scope="module")
def pipelines(tiny_pipelines):
    return tiny_pipelines  # made once per session (tests/conftest.py); these tests only read it


def _request(ckpt, out_dir, name, **kw):
    base = dict(ckpt=str(ckpt), prompts=PROMPTS, out=str(out_dir / name), frames=17, height=32, width=48, steps=6,
                shift=3.0, guidance=4.0, negative_prompt="a blurry still frame", seed=3, progress=False,
                save_latents=str(out_dir / f"{name}.pt"))
    base.update(kw)
    return GenerationRequest(**base)


def _generate(req, world=1, **layout):
    spawn_local(run_generate, world_size=world, args=(req, None), **layout)
    return torch.load(req.save_latents, weights_only=True)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_tp2_cp2_dp2_sample_the_same_latents_as_one_rank(pipelines, tmp_path):
    one = _generate(_request(pipelines / "megawan", tmp_path, "one"))
    assert one.shape == (2, 4, 5, 4, 6)
    layouts = {"tp2": dict(tensor_parallel=2), "cp2": dict(context_parallel=2),
               "cp2-ring": dict(context_parallel=2, context_parallel_mode="ring"), "dp2": {}}
    for name, layout in layouts.items():
        got = _generate(_request(pipelines / "megawan", tmp_path, name), world=2, **layout)
        assert _rel(got, one) < 1e-5, name
    # the videos were decoded and written once per prompt
    videos = sorted(f for f in os.listdir(tmp_path / "dp2") if f.endswith(".mp4"))
    assert videos == ["000_a_red_circle_moves_left.mp4", "001_a_blue_square_moves_down.mp4"]
    records = [json.loads((tmp_path / "dp2" / v.replace(".mp4", ".json")).read_text()) for v in videos]
    assert [(r["prompt"], r["seed"]) for r in records] == [(PROMPTS[0], 3), (PROMPTS[1], 4)]  # noise from seed + i
    assert all((tmp_path / "dp2" / v.replace(".mp4", ".webp")).is_file() for v in videos)  # animated previews


class _NoOptimizer:
    def sharded_state_dict(self, model_sharded, **kwargs):
        return {}


def _training_run(rank, pipeline, root):
    """A run's checkpoint (as the trainer writes one) of the pipeline's DiT: weights doubled, their EMA exact."""
    from megawan.artifacts import load_dit, resolve_model
    from megawan.checkpoint import save_checkpoint
    from megawan.config import config_to_dict
    from megawan.training.ema import EMA

    found = resolve_model(pipeline)
    model = load_dit(found["experts"]["transformer"], found["config"])
    ema = EMA([model], 0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    run = {"model": config_to_dict(found["config"]), "train": {"text_dropout": 0.1}}
    save_checkpoint(root, 5, [model], _NoOptimizer(), {"step": 5}, run, ema=ema)


def test_a_training_run_samples_with_its_ema_weights(pipelines, tmp_path):
    """--ckpt a run's checkpoint folder (its `latest`) + --encoders: the EMA weights by default, --no-ema the
    trained ones; text dropout in the run config makes the zero states the null condition."""
    from megawan.artifacts import resolve_model

    root = tmp_path / "run"
    spawn_local(_training_run, world_size=1, args=(str(pipelines / "megawan"), str(root)))
    found = resolve_model(str(root))
    assert found["null_text"] and found["encoders"] is None and list(found["experts"]) == ["transformer"]
    kw = dict(prompts=PROMPTS[:1], encoders=str(pipelines / "megawan"))
    pipeline = _generate(_request(pipelines / "megawan", tmp_path, "pipeline", **kw))
    ema = _generate(_request(root, tmp_path, "ema", **kw))
    assert _rel(ema, pipeline) < 1e-6
    trained = _generate(_request(root, tmp_path, "trained", use_ema=False, **kw))
    assert _rel(trained, pipeline) > 1e-3


def test_wanpipeline_given_our_export_samples_the_same_latents(pipelines, tmp_path):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    class WanGridUniPC(UniPCMultistepScheduler):
        """diffusers' UniPC on Wan's grid (its default flow grid differs from the official one)."""

        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    noise = torch.randn(1, 4, 5, 4, 6, generator=torch.Generator().manual_seed(7))
    torch.save(noise, tmp_path / "noise.pt")
    pipe = WanPipeline.from_pretrained(str(pipelines / "diffusers"))
    pipe.scheduler = WanGridUniPC.from_config(pipe.scheduler.config, flow_shift=3.0)
    theirs = pipe(prompt=PROMPTS[0], negative_prompt="a blurry still frame", height=32, width=48, num_frames=17,
                  num_inference_steps=8, guidance_scale=4.0, latents=noise.clone(), output_type="latent",
                  max_sequence_length=24).frames.float()
    ours = _generate(_request(pipelines / "megawan", tmp_path, "ours", prompts=PROMPTS[:1], steps=8,
                              noise=str(tmp_path / "noise.pt")))
    assert _rel(ours, theirs) < 1e-4
    assert _rel(noise, theirs) > 0.1  # it did sample


def test_cli_writes_the_mp4_from_given_noise(pipelines, tmp_path):
    from megawan.utils.media import read_video

    noise = torch.randn(4, 5, 4, 6, generator=torch.Generator().manual_seed(1))
    torch.save(noise, tmp_path / "noise.pt")
    cmd = [sys.executable, "-m", "megawan.cli", "generate", "--ckpt", str(pipelines / "megawan"), "--prompt",
           PROMPTS[0], "--frames", "17", "--height", "32", "--width", "48", "--steps", "5", "--sampler", "dpm++",
           "--noise", str(tmp_path / "noise.pt"), "--save-latents", str(tmp_path / "lat.pt"), "--vae-tiling", "32",
           "16", "--device", "cpu", "--out", str(tmp_path / "red.mp4")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("red.mp4")
    assert read_video(str(tmp_path / "red.mp4")).shape == (17, 32, 48, 3)
    # what was resolved is said once before sampling, and recorded beside the video
    record = json.loads((tmp_path / "red.json").read_text())
    assert f"48x32, 17 frames at {record['fps']} fps; 5 dpm++ steps, shift {record['shift']:g}" in out.stdout
    assert {k: record[k] for k in ("prompt", "steps", "sampler", "frames", "height", "width", "seed", "noise")} == \
        {"prompt": PROMPTS[0], "steps": 5, "sampler": "dpm++", "frames": 17, "height": 32, "width": 48, "seed": None,
         "noise": str(tmp_path / "noise.pt")}
    assert record["checkpoint"] == str(pipelines / "megawan") and record["guidance"] == 3.0
    assert record["negative_prompt"] and record["megawan"] and record["seconds"] > 0 and record["loras"] == []
    api = _generate(_request(pipelines / "megawan", tmp_path, "api", prompts=PROMPTS[:1], steps=5, sampler="dpm++",
                             noise=str(tmp_path / "noise.pt"), guidance=None, negative_prompt=None))
    # --device cpu (over gloo) is what the default (auto) gives on this CPU machine, bit for bit; official
    # defaults: guidance 3
    assert torch.equal(torch.load(tmp_path / "lat.pt", weights_only=True), api)
    bad = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "x.mp4"), "--frames", "16"], capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert bad.returncode == 2 and "frames must be 1 + 4k" in bad.stderr


def test_ti2v_keeps_the_given_first_frame(tmp_path):
    from PIL import Image

    from megawan.config import vae_preset
    from megawan.artifacts import load_vae

    make_official_pipeline(tmp_path / "official", preset="tiny-ti2v", vae="tiny-2.2", dtype=torch.float32,
                           overrides=dict(in_dim=6, out_dim=6, text_dim=32, text_len=24))
    convert_pipeline(str(tmp_path / "official"), "official", str(tmp_path / "mw"), "megawan")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[8:24, 8:24] = (230, 40, 40)
    Image.fromarray(image).save(tmp_path / "first.png")
    lat = _generate(_request(tmp_path / "mw", tmp_path, "ti2v", prompts=PROMPTS[:1], height=32, width=32,
                             image=str(tmp_path / "first.png")))
    vae = load_vae(str(tmp_path / "official" / "Wan2.2_VAE.pth"), vae_preset("tiny-2.2"))
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None, :, None] / 127.5 - 1
    with torch.no_grad():
        z0 = vae.normalize(vae.encode(pixels)[0])
    assert torch.allclose(lat[:, :, :1], z0, atol=1e-6)
    assert lat[:, :, 1:].abs().mean() > 0.1


def test_a14b_uses_each_expert_with_its_own_guidance(tmp_path):
    make_official_pipeline(tmp_path / "official", preset="tiny-a14b", dtype=torch.float32, overrides=TINY_T2V)
    convert_pipeline(str(tmp_path / "official"), "official", str(tmp_path / "mw"), "megawan", boundary=0.875)
    run = dict(prompts=PROMPTS[:1], steps=8, shift=5.0)
    base = _generate(_request(tmp_path / "mw", tmp_path, "base", guidance=(3.0, 4.0), **run))
    # the high-noise expert's scale matters only for the steps above the boundary, the low one's below
    high = _generate(_request(tmp_path / "mw", tmp_path, "high", guidance=(3.0, 6.0), **run))
    low = _generate(_request(tmp_path / "mw", tmp_path, "low", guidance=(5.0, 4.0), **run))
    assert _rel(high, base) > 1e-3 and _rel(low, base) > 1e-3
    tp2 = _generate(_request(tmp_path / "mw", tmp_path, "tp2", guidance=(3.0, 4.0), **run), world=2,
                    tensor_parallel=2)
    assert _rel(tp2, base) < 1e-5
    with pytest.raises(Exception):  # one scale per expert is also accepted; a missing expert is not
        (tmp_path / "mw" / "low_noise_model" / "metadata.json").unlink()
        _generate(_request(tmp_path / "mw", tmp_path, "broken", **run))


def test_device_cpu_is_the_default_here_and_a_device_the_job_cannot_use_is_refused(pipelines, tmp_path, capsys):
    """auto is rank_device(): the CPU on this machine, the same samples as device="cpu"; --device cuda without
    CUDA, and a device the process group cannot communicate, are one-line errors naming --device."""
    from megawan.capabilities import cuda_available
    from megawan.cli import main
    from megawan.generation import generation_device

    kw = dict(prompts=PROMPTS[:1], steps=3)
    auto = _generate(_request(pipelines / "megawan", tmp_path, "auto", **kw))
    cpu = _generate(_request(pipelines / "megawan", tmp_path, "cpu", device="cpu", **kw))
    assert torch.equal(cpu, auto)
    assert generation_device("auto", "gloo", 1) == torch.device("cpu")
    assert generation_device("auto", "gloo", 4) == torch.device("cpu")  # gloo across ranks: CPU tensors
    with pytest.raises(ValueError, match="^--device cpu: the process group is NCCL"):
        generation_device("cpu", "nccl", 2)
    with pytest.raises(ValueError, match="^--device cuda: the process group is gloo" if cuda_available()
                       else "^--device cuda: this machine has no CUDA device"):
        generation_device("cuda", "gloo", 2)
    if not cuda_available():  # refused before any process group starts
        assert main(["generate", "--ckpt", str(pipelines / "megawan"), "--prompt", "x", "--device", "cuda"]) == 2
        assert capsys.readouterr().err == ("megawan generate: --device cuda: this machine has no CUDA device "
                                           "(use --device cpu or auto)\n")
