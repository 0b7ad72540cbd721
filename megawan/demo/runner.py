"""The tiny end-to-end job on CPU, every stage a user runs at scale, in minutes:

    1. synthetic moving-shape clips and stills (captions name colour, shape, direction) + a held-out set,
       tiny encoders (a tiny Wan-VAE trained for `vae_steps` (default 300, ~1.5 min) as an autoencoder of the
       shapes, a random umT5, a sentencepiece tokenizer trained on the captions)
    2. precompute: decode -> bucket -> VAE latents + umT5 states -> Zarr stores (training and held-out)
    3. `megawan train` under torchrun on 4 CPU ranks, tensor parallel 2 x data parallel 2 (distributed
       optimizer), joint image + video batches, EMA, text dropout for guidance, checkpoints, validation
       (held-out loss, held-out prompts sampled and decoded to mp4 + contact sheet), TensorBoard events when
       tensorboard is installed, and the loss plot <out>/loss.png (megawan.training.loss_plot)
    4. the colour check: the dominant colour of each held-out prompt's generated frames against the colour
       its caption names (megawan.demo.shapes.dominant_color); shape and direction are measured beside it by
       the synthetic suite `megawan eval` uses (megawan.evaluation.synthetic_suite) and recorded, not required
    5. `megawan generate` samples the checkpoint for new prompts on 2 ranks (tensor parallel) -> mp4

    megawan demo --out runs/demo          (python -m megawan.cli demo)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from megawan.demo.tiny_assets import TINY_VAE_STEPS
from megawan.demo.tiny_dataset import make_tiny_dataset
from megawan.evaluation.synthetic_suite import score_clip, suite_accuracy
from megawan.generation import slug
from megawan.parallel.launch import free_port
from megawan.training.loss_plot import load_curves, plot_loss
from megawan.training.validation import frames_of, read_samples
from megawan.utils.user_errors import UserError

DEMO_STEPS = 1200  # the demo's training steps: >= 90 % of the held-out colours (tests/test_demo.py)
DEMO_PROMPTS = ("a red circle moves right", "a blue square moves down", "a yellow triangle moves left")


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def demo_config(out_dir: str, store: str, held_out: str, vae: str, steps: int, held_out_samples: int) -> dict:
    """The run config the demo trains with (written to <out>/demo.yaml: `megawan train --config` takes it)."""
    return {
        # the tiny preset widened to 64 (4 heads): at 32 wide it mixed neighbouring hues (75 % right after 1200
        # steps); 64 wide reaches >= 90 % in the same steps for ~10 % more time per step
        "model": {"preset": "tiny", "in_dim": 4, "out_dim": 4, "text_dim": 32, "text_len": 24, "dim": 64,
                  "ffn_dim": 128, "num_heads": 4},
        "parallel": {"tensor_parallel": 2},  # x data parallel 2 on 4 ranks
        "data": {"store": store, "video_ratio": 0.5, "global_batch_size": 8, "image_global_batch_size": 16,
                 "micro_batch_size": 4},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 50, "decay": "cosine", "weight_decay": 0.0},
        "train": {"steps": steps, "precision": "fp32", "shift": 3.0, "ema_decay": 0.99, "text_dropout": 0.1,
                  "log_every": 10},
        "checkpoint": {"dir": os.path.join(out_dir, "checkpoints"), "every": max(steps // 2, 1), "keep": 2},
        "logging": {"progress": True, "tensorboard": "auto"},  # events in <out>/checkpoints/logs/tensorboard
        "validation": {"every": steps, "store": held_out, "num_samples": held_out_samples,
                       "batch_size": held_out_samples, "sampler": "unipc", "steps": 20, "shift": 3.0,
                       "guidance": 3.0, "vae": vae},
    }


def train_under_torchrun(config_path: str, nproc: int) -> float:
    """`megawan train --config config_path` under torchrun on `nproc` local CPU ranks (its log on this terminal);
    the seconds it took. Raises if training fails."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "megawan.cli", "train", "--config", config_path]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); the log is above")
    return round(time.perf_counter() - t0, 1)


def _percent(share) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def plot_demo_loss(metrics: str, out: str) -> str | None:
    """<out>/loss.png: the training loss by step, the held-out loss, the learning rate (tools/plot_metrics.py's
    picture). Without matplotlib (the `logging` extra) the demo goes on without it, saying so."""
    try:
        path = plot_loss(load_curves(metrics), out, window=100, title="megawan demo: tiny DiT, TP2 x DP2 on CPU")
    except UserError as e:
        _say(f"    no loss plot: {e}")
        return None
    _say(f"    loss plot {path}")
    return path


def color_accuracy(rows: list) -> dict:
    """The synthetic suite on sampled held-out rows: {"accuracy": share whose frames' dominant colour is the
    colour their caption names, "correct", "total", "shape_accuracy", "direction_accuracy" (the suite's other
    two checks, over the rows whose caption names them), "samples": [{"id", "caption", "expected", "found",
    "expected_shape", "shape", "expected_direction", "direction"}]}."""
    scored = suite_accuracy([score_clip(frames_of(row), row["caption"], row["id"]) for row in rows])
    samples = [{"id": r["id"], "caption": r["caption"], "expected": r["expected_color"], "found": r["color"],
                "expected_shape": r["expected_shape"], "shape": r["shape"],
                "expected_direction": r["expected_direction"], "direction": r["direction"]}
               for r in scored["samples"]]
    right = sum(r["expected"] == r["found"] for r in samples)
    return {"accuracy": right / max(len(samples), 1), "correct": right, "total": len(samples),
            "shape_accuracy": scored["shape"], "direction_accuracy": scored["direction"], "samples": samples}


def run_demo(out_dir: str = "runs/demo", steps: int = DEMO_STEPS, videos: int = 96, images: int = 64,
             held_out_videos: int = 24, vae_steps: int | None = None, nproc: int = 4,
             prompts: tuple = DEMO_PROMPTS, encoders: dict | None = None) -> dict:
    """Run the demo into `out_dir`; returns the summary (also written to <out>/summary.json).

    `encoders`: encoder files written by megawan.demo.tiny_assets.write_tiny_encoders to use instead of writing
    (and training) new ones; `vae_steps` is then unused. The tests pass the session's trained encoders, so that
    the tiny VAE is trained once per test session rather than once per test.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "checkpoints")):
        raise FileExistsError(f"{out_dir}/checkpoints exists: choose another --out or remove it")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    timings = {}

    _say(f"1-2/5 synthetic clips ({videos} + {held_out_videos} held out) and stills ({images}), tiny encoders, "
         f"precomputed latents")
    t0 = time.perf_counter()
    kwargs = {"train_vae_steps": TINY_VAE_STEPS if vae_steps is None else vae_steps}
    store, encoders = make_tiny_dataset(os.path.join(out_dir, "data"), videos=videos, images=images,
                                        held_out_videos=held_out_videos, held_out_images=0, encoders=encoders,
                                        progress=True, **kwargs)  # VAE training and precompute lines
    held_out = os.path.join(out_dir, "data", "held_out.zarr")
    timings["data_s"] = round(time.perf_counter() - t0, 1)
    _say(f"    training store {store}, held-out store {held_out} ({timings['data_s']} s)")

    config = demo_config(out_dir, store, held_out, encoders["vae"], steps, held_out_videos)
    config_path = os.path.join(out_dir, "demo.yaml")
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    _say(f"3/5 training {steps} steps on {nproc} CPU ranks (TP2 x DP{nproc // 2}, gloo): "
         f"torchrun -m megawan.cli train --config {config_path}")
    timings["train_s"] = train_under_torchrun(config_path, nproc)

    metrics = os.path.join(out_dir, "checkpoints", "logs", "metrics.jsonl")
    loss_plot = plot_demo_loss(metrics, os.path.join(out_dir, "loss.png"))

    _say("4/5 the colour check on the held-out prompts sampled by the last validation")
    validation = os.path.join(out_dir, "checkpoints", "logs", "validation", f"step-{steps:07d}")
    colours = color_accuracy(read_samples(validation))
    with open(os.path.join(out_dir, "color_accuracy.json"), "w", encoding="utf-8") as f:
        json.dump(colours, f, indent=2)
    _say(f"    dominant colour = caption colour for {colours['correct']}/{colours['total']} held-out prompts "
         f"({100 * colours['accuracy']:.0f}%); beside it, not required: shape {_percent(colours['shape_accuracy'])}, "
         f"direction {_percent(colours['direction_accuracy'])}")

    samples = os.path.join(out_dir, "samples")
    prompts_file = os.path.join(out_dir, "prompts.txt")
    with open(prompts_file, "w", encoding="utf-8") as f:
        f.writelines(p + "\n" for p in prompts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megawan.cli", "generate", "--ckpt", os.path.join(out_dir, "checkpoints"), "--encoders",
           os.path.dirname(encoders["vae"]), "--prompts", prompts_file, "--frames", "17", "--height", "32",
           "--width", "48", "--steps", "20", "--shift", "3", "--guidance", "3", "--tensor-parallel", "2",
           "--out", samples]
    _say(f"5/5 megawan generate for {len(prompts)} new prompts on 2 ranks (TP2): {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"megawan generate failed (exit {proc.returncode}); the log is above")
    videos_out = [os.path.join(samples, f"{i:03d}_{slug(p)}.mp4") for i, p in enumerate(prompts)]
    missing = [v for v in videos_out if not os.path.isfile(v)]
    if missing:
        raise RuntimeError(f"megawan generate did not write {missing}")
    timings["sample_s"] = round(time.perf_counter() - t0, 1)

    summary = {
        "seconds": round(time.perf_counter() - start, 1), **timings,
        "config": config_path, "training_store": store, "held_out_store": held_out, "encoders": encoders,
        "checkpoints": os.path.join(out_dir, "checkpoints"),
        "metrics": metrics, "loss_plot": loss_plot,
        "tensorboard": os.path.join(out_dir, "checkpoints", "logs", "tensorboard"),
        "validation": validation, "contact_sheet": os.path.join(validation, "contact_sheet.png"),
        "color_accuracy": colours["accuracy"], "shape_accuracy": colours["shape_accuracy"],
        "direction_accuracy": colours["direction_accuracy"], "videos": dict(zip(prompts, videos_out)),
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    _say(f"done in {summary['seconds']} s")
    for key in ("config", "checkpoints", "metrics", "loss_plot", "tensorboard", "contact_sheet"):
        if summary[key] and os.path.exists(summary[key]):
            _say(f"    {key:14} {summary[key]}")
    for prompt, path in summary["videos"].items():
        _say(f"    {prompt!r:30} -> {path}")
    _say(f"    summary        {os.path.join(out_dir, 'summary.json')}")
    return summary
