"""The tiny LoRA task: a LoRA fine-tune teaches the demo's pre-trained model a colour word it never saw.

The demo's model (megawan.demo.runner) is pre-trained on the six COLORS; neither it nor the tokenizer ever saw
"orange" (megawan.demo.shapes.UNSEEN_COLORS). The task, every stage a user runs to fine-tune a LoRA:

    1. the base: the demo's checkpoint and encoders (`--base DIR`: a finished `megawan demo` run; else the demo
       is run first, into <out>/base)
    2. a small store of orange clips (captions "a orange <shape> moves <direction>") on 8 of the 12
       shape / direction combinations, with a few clips of the known colours so that they stay as they were;
       a held-out store of orange clips on the other 4 combinations (and a few known-colour clips)
    3. `megawan train` with a `lora:` section and `checkpoint.init_from: <base>` on one CPU rank: only the
       adapters train; the last validation samples every held-out clip's caption
    4. the check: the dominant colour of each held-out sample (megawan.demo.shapes.dominant_color over
       COLORS + orange) against its caption's; and, for contrast, `megawan generate` of the base without the
       adapters on the same orange prompts (it never learnt the word: it draws a colour it knows)

    megawan demo --task lora --out runs/lora [--base runs/demo]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from megawan.data.precompute import PrecomputeJob, run_precompute
from megawan.demo.runner import DEMO_STEPS, demo_config, run_demo, train_under_torchrun
from megawan.demo.shapes import COLORS, DIRECTIONS, PALETTE, SHAPES, UNSEEN_COLORS, ShapeClip, caption_color, \
    dominant_color, render
from megawan.demo.tiny_dataset import VIDEO_BUCKET
from megawan.generation import slug
from megawan.parallel.launch import free_port
from megawan.training.validation import frames_of, read_samples
from megawan.utils.media import write_video

NEW_COLOR = "orange"
assert NEW_COLOR in UNSEEN_COLORS and NEW_COLOR not in COLORS
# held out: 4 of the 12 shape / direction combinations (each shape and each direction still trains elsewhere)
HELD_OUT = (("circle", "left"), ("square", "up"), ("triangle", "right"), ("triangle", "down"))
LORA_STEPS = 300
# alpha twice the rank (the adapters' update scaled by 2): on the demo model of the train-vae VAE, alpha 8 drew
# orange for 16 of 20 held-out prompts (the misses red), alpha 16 for 18 (docs/vae_training.md)
LORA = {"rank": 8, "alpha": 16}
# classifier-free guidance of the held-out samples, after the fine-tune and of the base alike: Wan's default for
# text-to-video. At 3 (the demo's) orange triangles still came out red on a base whose data was encoded
# reproducibly (15 of 20 orange; at 5: 20 of 20)
GUIDANCE = 5.0


def _say(message: str) -> None:
    print(f"[lora task] {message}", flush=True)


def task_clips(seed: int = 0, per_combination: int = 4, known: int = 16, held_out_per_combination: int = 5,
               held_out_known: int = 4) -> tuple:
    """(fine-tune clips, held-out clips): lists of (ShapeClip, render seed). The fine-tune set: `per_combination`
    orange clips of each combination not in HELD_OUT plus `known` clips of the known colours (cycling through
    COLORS); the held-out set: `held_out_per_combination` orange clips of each HELD_OUT combination, then
    `held_out_known` known-colour clips."""
    trained = [(s, d) for s in SHAPES for d in DIRECTIONS if (s, d) not in HELD_OUT]
    colors = list(COLORS)
    tune = [(ShapeClip(NEW_COLOR, s, d), seed * 100_003 + i * 97 + k)
            for i, (s, d) in enumerate(trained) for k in range(per_combination)]
    combos = [(s, d) for s in SHAPES for d in DIRECTIONS]
    tune += [(ShapeClip(colors[k % len(colors)], *combos[(5 * k) % len(combos)]), seed * 100_003 + 50_000 + k)
             for k in range(known)]
    held = [(ShapeClip(NEW_COLOR, s, d), seed * 100_003 + 70_000 + i * 97 + k)
            for i, (s, d) in enumerate(HELD_OUT) for k in range(held_out_per_combination)]
    held += [(ShapeClip(colors[k % len(colors)], *HELD_OUT[k % len(HELD_OUT)]), seed * 100_003 + 90_000 + k)
             for k in range(held_out_known)]
    return tune, held


def precompute_clips(root: str, name: str, clips: list, encoders: dict) -> str:
    """Render `clips` ((ShapeClip, seed) pairs) to mp4 under <root>/<name>_videos and precompute them with
    `encoders` into <root>/<name>.zarr (the demo's clip bucket); returns the store's path."""
    folder = os.path.join(root, f"{name}_videos")
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i, (clip, seed) in enumerate(clips):
        path = os.path.join(folder, f"{name}_{i:05d}.mp4")
        write_video(path, render(clip, 17, 32, 48, seed=seed))
        rows.append({"id": f"{name}_{i:05d}", "path": path, "caption": clip.caption})
    manifest = os.path.join(root, f"{name}.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    store = os.path.join(root, f"{name}.zarr")
    run_precompute(PrecomputeJob(manifest=manifest, out=store, vae=encoders["vae"], vae_config=encoders["vae_config"],
                                 text_encoder=encoders["text_encoder"], text_config=encoders["text_config"],
                                 tokenizer=encoders["tokenizer"], buckets=[VIDEO_BUCKET], decode_workers=2),
                   progress=False)
    return store


def lora_task_config(out_dir: str, base: str, store: str, held_out: str, vae: str, steps: int,
                     held_out_samples: int) -> dict:
    """The run config of the fine-tune (written to <out>/lora_task.yaml; `megawan train --config` takes it): the
    demo's model, LoRA adapters on every block linear of it, the base weights from `base`, one rank."""
    model = demo_config(out_dir, store, held_out, vae, steps, held_out_samples)["model"]
    return {
        "model": model,
        "parallel": {"tensor_parallel": 1},
        "data": {"store": store, "video_ratio": 1.0, "global_batch_size": 8, "micro_batch_size": 8},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20, "decay": "cosine", "weight_decay": 0.0},
        "train": {"steps": steps, "precision": "fp32", "shift": 3.0, "ema_decay": 0.0, "text_dropout": 0.1,
                  "log_every": 10},
        "checkpoint": {"dir": os.path.join(out_dir, "checkpoints"), "every": steps, "keep": 1, "init_from": base},
        "lora": dict(LORA),
        "logging": {"progress": True, "tensorboard": False},
        "validation": {"every": steps, "store": held_out, "num_samples": held_out_samples,
                       "batch_size": held_out_samples, "sampler": "unipc", "steps": 20, "shift": 3.0,
                       "guidance": GUIDANCE, "vae": vae},
    }


def color_check(rows: list) -> dict:
    """Per sampled row (a validation row or {"caption", "video"}): the caption's colour and the dominant colour
    of its frames over COLORS + the unseen colours; the share right among the new colour's rows and among the
    known colours' rows."""
    results = [{"caption": r["caption"], "expected": caption_color(r["caption"], PALETTE),
                "found": dominant_color(frames_of(r), palette=PALETTE)} for r in rows]

    def share(chosen: list):
        return sum(r["expected"] == r["found"] for r in chosen) / len(chosen) if chosen else None

    new = [r for r in results if r["expected"] == NEW_COLOR]
    known = [r for r in results if r["expected"] != NEW_COLOR]
    return {"new_color_accuracy": share(new), "new_color_total": len(new), "known_color_accuracy": share(known),
            "known_color_total": len(known), "samples": results}


def generate_base(base: str, encoders: dict, prompts: list, out: str) -> list:
    """`megawan generate` of the base checkpoint (no adapters) for `prompts` on one rank: one mp4 per prompt
    (seed 0 + index, as the command numbers them); their paths."""
    prompts_file = os.path.join(os.path.dirname(out), "base_prompts.txt")
    with open(prompts_file, "w", encoding="utf-8") as f:
        f.writelines(p + "\n" for p in prompts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           "-m", "megawan.cli", "generate", "--ckpt", base, "--encoders", os.path.dirname(encoders["vae"]),
           "--prompts", prompts_file, "--frames", "17", "--height", "32", "--width", "48", "--steps", "20",
           "--shift", "3", "--guidance", str(GUIDANCE), "--device", "cpu", "--out", out]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"megawan generate of the base failed (exit {proc.returncode}); the log is above")
    return [os.path.join(out, f"{i:03d}_{slug(p)}.mp4") for i, p in enumerate(prompts)]


def run_lora_task(out_dir: str = "runs/lora", base: str | None = None, steps: int = LORA_STEPS,
                  encoders: dict | None = None) -> dict:
    """Run the task into `out_dir`; returns the summary (also written to <out>/summary.json).

    `base`: a finished demo's folder (its checkpoints/ and summary.json's encoders); None runs the demo into
    <out>/base first (with `encoders` when given, else training new ones)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "checkpoints")):
        raise FileExistsError(f"{out_dir}/checkpoints exists: choose another --out or remove it")
    os.makedirs(out_dir, exist_ok=True)
    start, timings = time.perf_counter(), {}
    if base is None:
        _say(f"1/4 no --base: pre-training the demo's model first ({DEMO_STEPS} steps, megawan demo)")
        base = os.path.join(out_dir, "base")
        run_demo(base, encoders=encoders)
    base = os.path.abspath(base)
    summary_file = os.path.join(base, "summary.json")
    if not os.path.isfile(summary_file):
        raise FileNotFoundError(f"--base {base}: no summary.json; give the folder of a finished `megawan demo`")
    with open(summary_file, encoding="utf-8") as f:
        encoders = json.load(f)["encoders"]
    checkpoint = os.path.join(base, "checkpoints")
    _say(f"1/4 the base: {checkpoint} (encoders {os.path.dirname(encoders['vae'])})")

    t0 = time.perf_counter()
    tune, held = task_clips()
    data = os.path.join(out_dir, "data")
    store = precompute_clips(data, "lora", tune, encoders)
    held_out = precompute_clips(data, "held_out", held, encoders)
    timings["data_s"] = round(time.perf_counter() - t0, 1)
    _say(f"2/4 {len(tune)} fine-tune clips ({sum(c.color == NEW_COLOR for c, _ in tune)} {NEW_COLOR}) -> {store}, "
         f"{len(held)} held out -> {held_out} ({timings['data_s']} s)")

    config = lora_task_config(out_dir, checkpoint, store, held_out, encoders["vae"], steps, len(held))
    config_path = os.path.join(out_dir, "lora_task.yaml")
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    _say(f"3/4 LoRA (rank {LORA['rank']}) fine-tune, {steps} steps on one CPU rank: "
         f"torchrun -m megawan.cli train --config {config_path}")
    timings["train_s"] = train_under_torchrun(config_path, nproc=1)

    _say("4/4 the held-out prompts' colours after the fine-tune, and the base's without the adapters")
    validation = os.path.join(out_dir, "checkpoints", "logs", "validation", f"step-{steps:07d}")
    after = color_check(read_samples(validation))
    t0 = time.perf_counter()
    prompts = [c.caption for c, _ in held if c.color == NEW_COLOR]
    videos = generate_base(checkpoint, encoders, prompts, os.path.join(out_dir, "base_samples"))
    before = color_check([{"caption": p, "video": v} for p, v in zip(prompts, videos)])
    timings["base_sample_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out_dir, "lora_accuracy.json"), "w", encoding="utf-8") as f:
        json.dump({"after": after, "before": before}, f, indent=2)
    summary = {"seconds": round(time.perf_counter() - start, 1), **timings, "config": config_path, "base": checkpoint,
               "training_store": store, "held_out_store": held_out, "encoders": encoders,
               "checkpoints": os.path.join(out_dir, "checkpoints"), "validation": validation,
               "contact_sheet": os.path.join(validation, "contact_sheet.png"), "new_color": NEW_COLOR,
               "new_color_accuracy": after["new_color_accuracy"],
               "known_color_accuracy": after["known_color_accuracy"],
               "base_new_color_accuracy": before["new_color_accuracy"],
               "base_colors": sorted({r["found"] or "none" for r in before["samples"]})}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    n, k = after["new_color_total"], after["known_color_total"]
    _say(f"    {NEW_COLOR} on {round(after['new_color_accuracy'] * n)}/{n} held-out {NEW_COLOR} prompts after the "
         f"fine-tune; the base without adapters: {round(before['new_color_accuracy'] * n)}/{n} (it drew "
         f"{', '.join(summary['base_colors'])}); known colours kept on {round(after['known_color_accuracy'] * k)}/{k}")
    _say(f"    done in {summary['seconds']} s; contact sheet {summary['contact_sheet']}")
    return summary
