"""The demo's tiny VAE, trained by `megawan train-vae` (the one VAE trainer): the synthetic shapes written as real
files and a manifest, the report's stage 1 (image VAE on stills) and stage 2 (inflated into the 3D causal VAE,
clips and stills) run in this process on one rank, and the trained weights read back from the last checkpoint.

    state, cfg, stats = train_tiny_vae("work/encoders/vae_training", steps=TINY_VAE_STEPS, seed=0)

The recipe is the two configs in examples/configs/vae/ (TINY_VAE_CONFIGS); this module only points them at its
folder (data.manifest, checkpoint.dir, init.from, validation.manifest), splits `steps` between the stages in the
configs' proportion and seeds them. Why this recipe and what it reaches: docs/vae_training.md ("The demo's tiny
VAE").
"""

from __future__ import annotations

import json
import os
import random
import time

import yaml

import megawan
from megawan.demo.shapes import COLORS, DIRECTIONS, SHAPES, ShapeClip, render
from megawan.utils.media import write_image, write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(megawan.__file__)))
TINY_VAE_CONFIGS = tuple(os.path.join(REPO, "examples", "configs", "vae", f"tiny_demo_stage{i}.yaml") for i in (1, 2))
# training data per step of the recipe: stills (32 x 32 png) and clips (17 x 32 x 32 mp4), so that the 500 steps
# (400 x 8 stills, then 100 x 4 samples, half of them clips) see each sample about once, as fresh renders would
# (3300 + 200). Held out: 8 + 8. The six COLORS only: with the LoRA task's "orange" in the VAE's data too, the LoRA
# on the demo model drew orange less often (11 against 16 of 20: docs/vae_training.md).
STILLS_PER_STEP, CLIPS_PER_STEP, HELD_OUT = 6.6, 0.4, 8


def _config_steps(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return int(yaml.safe_load(f)["train"]["steps"])


def stage_steps(steps: int) -> tuple:
    """`steps` split between stage 1 and stage 2 in the proportion of their configs' train.steps (each >= 1)."""
    s1, s2 = (_config_steps(p) for p in TINY_VAE_CONFIGS)
    first = min(max(1, round(steps * s1 / (s1 + s2))), max(1, steps - 1))
    return first, max(1, steps - first)


def data_counts(steps: int) -> tuple:
    """(stills, clips) to write for a `steps`-step training: STILLS_PER_STEP / CLIPS_PER_STEP per step, at least
    16 / 4."""
    return max(16, round(STILLS_PER_STEP * steps)), max(4, round(CLIPS_PER_STEP * steps))


def write_vae_data(folder: str, seed: int, stills: int, clips: int, held_out: int = HELD_OUT) -> tuple:
    """(manifest, held-out manifest): the shapes as files, as a user's data would be: `stills` PNG stills (one random
    frame of a random clip each; data_counts says how many for a training) and `clips` H.264 clips of 17 frames at
    16 fps, 32 x 32; the held-out rows from other draws."""
    os.makedirs(folder, exist_ok=True)
    manifests = []
    for name, n_stills, n_clips, salt in (("manifest", stills, clips, 0), ("held_out", held_out, held_out, 7_777)):
        rng = random.Random(seed * 1_000_003 + salt)
        rows = []
        for i in range(n_stills + n_clips):
            clip = ShapeClip(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)))
            frames = render(clip, 17, 32, 32, seed=rng.randrange(1 << 30))
            if i < n_stills:
                path = f"{name}_still_{i:05d}.png"
                write_image(os.path.join(folder, path), frames[rng.randrange(len(frames))])
            else:
                path = f"{name}_clip_{i:05d}.mp4"
                write_video(os.path.join(folder, path), frames, 16)
            rows.append({"id": path.rsplit(".", 1)[0], "path": path, "caption": clip.caption})
        manifests.append(os.path.join(folder, f"{name}.jsonl"))
        with open(manifests[-1], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return tuple(manifests)


def train_tiny_vae(folder: str, steps: int, seed: int = 0, vae_config: str = "tiny-2.1",
                   progress: bool = False) -> tuple:
    """Train the tiny VAE with `megawan train-vae` (stage 1 then stage 2, in this process) under `folder`.

    Returns (state dict in WanVAE names, VAEConfig, stats): the stage-2 checkpoint's weights (its EMA), and
    {"steps", "seconds", "cpu_seconds", "stages": [{"config", "steps", "seconds"}], "psnr", "ssim" (held out,
    the job's validation at its last step, dB / 0-1)}."""
    from megawan.training.vae_trainer import train_vae  # torch + megatron-core: only when training
    from megawan.vae_export import read_trained_vae

    start, cpu_start = time.time(), time.process_time()
    manifest, held_out = write_vae_data(os.path.join(folder, "data"), seed, *data_counts(steps))
    first, second = stage_steps(steps)
    common = [f"data.manifest={manifest}", f"train.seed={seed}", f"vae.preset={vae_config}",
              f"logging.progress={str(progress).lower()}"]
    runs = [(TINY_VAE_CONFIGS[0], os.path.join(folder, "stage1_image"), first, []),
            (TINY_VAE_CONFIGS[1], os.path.join(folder, "stage2_clips"), second,
             [f"init.from={os.path.join(folder, 'stage1_image')}", f"validation.manifest={held_out}",
              f"validation.every={second}"])]
    stages, result = [], {}
    for config, ckpt, n, extra in runs:
        t = time.time()
        result = train_vae(config, tuple(common + [f"checkpoint.dir={ckpt}", f"train.steps={n}",
                                                   f"checkpoint.every={n}"] + extra))
        stages.append({"config": os.path.relpath(config, REPO), "steps": n, "seconds": round(time.time() - t, 1)})
    state, cfg = read_trained_vae(os.path.join(folder, "stage2_clips"))
    val = result.get("val") or {}
    stats = {"steps": first + second, "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu_start,
             "stages": stages, "psnr": val.get("val/psnr"), "ssim": val.get("val/ssim")}
    return state, cfg, stats
