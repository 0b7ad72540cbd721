"""Judging VAEs on held-out clips: PSNR, SSIM and (with its weight files) LPIPS of the reconstructions, per bucket
(resolution x length) and overall, several VAEs side by side on the same clips. `tools/eval_vae.py` is the command
line. The scoring itself, `evaluate_vae`, lives in megawan.models.vae.scores (re-exported here), where a training
loop's validation can call it too.

    vae = load_any_vae("runs/vae/checkpoints")[1]     # a train-vae checkpoint, an official .pth, a diffusers folder
    clips, skipped = eval_clips("held_out.jsonl", ["17x256x256", "1x256x256"])        # megawan.data.eval_clips
    result = evaluate_vae(vae, clips, lpips=LPIPS.from_files(vgg, lin))
    result["buckets"]["17x256x256"]   # {"psnr": dB, "ssim": ..., "lpips": ..., "samples": n}; result["overall"] alike
    compare_vaes({"trained": vae, "official": other}, clips, "eval_out", lpips=net)   # results.json + media

A reconstruction is decode(posterior mean): deterministic, what a latent store holds and the DiT's samples are
decoded from. The metrics: megawan.models.vae.scores.

compare_vaes writes into its folder: results.json (every number, per sample too), table.txt (what is printed),
media/<clip>@<bucket>/original.mp4 + <vae>.mp4 (png for one frame) and strips/<clip>@<bucket>.png (rows:
the original, then each VAE with its PSNR; columns: up to 8 frames evenly spread) for the first `media` samples.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from megawan.artifacts import detect_vae_preset, load_vae
from megawan.checkpoint import LATEST, is_checkpoint
from megawan.config import ConfigError, vae_preset
from megawan.config.vae_files import vae_config_named
from megawan.convert import load_state_dict_file
from megawan.models.vae.scores import METRICS, evaluate_vae
from megawan.utils.images import captioned_rows, contact_sheet, video_to_uint8
from megawan.utils.media import media_suffix, write_media
from megawan.vae_export import CONFIG_FILE, DIFFUSERS_DIR, DIFFUSERS_WEIGHTS, build_vae, read_trained_vae

STRIP_FRAMES = 8


# ----------------------------------------------------------------------------------------------
# Loading a VAE from whatever it was written as


def _label(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return f"{parent}/{base}" if base in ("checkpoints", DIFFUSERS_DIR) or base.startswith("iter_") else base


def load_any_vae(spec: str, device="cpu", ema: Optional[bool] = None) -> tuple:
    """(label, WanVAE in eval mode) from `spec`: "[LABEL=]PATH", PATH a train-vae checkpoint or run root (EMA weights
    where present unless ema=False), an official / megawan weight file (its preset detected, or the vae_config.json
    beside it), or a diffusers AutoencoderKLWan folder (or a folder holding one as vae/)."""
    label, _, path = spec.rpartition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
    label = label or _label(path)
    if os.path.isdir(path):
        if is_checkpoint(path) or os.path.isfile(os.path.join(path, LATEST)):
            return label, build_vae(*read_trained_vae(path, ema), device=device)
        weights = os.path.join(path, DIFFUSERS_WEIGHTS)
        if os.path.isfile(weights):
            return label, load_vae(weights, vae_config_named(path, f"--vae {path}"), device=device)
        if os.path.isdir(os.path.join(path, DIFFUSERS_DIR)):
            return load_any_vae(f"{label}={os.path.join(path, DIFFUSERS_DIR)}", device, ema)
        raise ConfigError(f"--vae {path}: a folder that is neither a train-vae checkpoint nor a diffusers VAE "
                          f"({DIFFUSERS_WEIGHTS} + config.json)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--vae {path}: no such file or folder")
    beside = os.path.join(os.path.dirname(path), CONFIG_FILE)
    if os.path.isfile(beside):  # an exported VAE: its architecture and latent statistics
        cfg = vae_config_named(beside, f"--vae {path}")
    else:
        cfg = vae_preset(detect_vae_preset(load_state_dict_file(path, mmap=True), path))
    return label, load_vae(path, cfg, device=device)


# ----------------------------------------------------------------------------------------------
# Several VAEs side by side, written to a folder


def format_table(results: dict) -> str:
    """One line per (bucket, VAE), the buckets then "overall"; '-' where a metric was not measured."""
    lines = [f"{'bucket':<14} {'vae':<24} {'samples':>7} {'PSNR':>7} {'SSIM':>7} {'LPIPS':>7}"]
    vaes = results["vaes"]
    buckets = sorted({b for v in vaes.values() for b in v["buckets"]}) + ["overall"]
    for bucket in buckets:
        for label, result in vaes.items():
            m = result["overall"] if bucket == "overall" else result["buckets"].get(bucket)
            if m is None:
                continue
            cells = [f"{m[k]:7.2f}" if k == "psnr" else f"{m[k]:7.4f}" if k in m else f"{'-':>7}" for k in METRICS]
            lines.append(f"{bucket:<14} {label:<24} {m['samples']:>7} {' '.join(cells)}")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name)


def _write_media(out: str, clips: list, results: dict, recons: dict, fps: int) -> None:
    for i, clip in enumerate(clips):
        name = _safe(f"{clip['id']}@{clip['bucket']}")
        folder = os.path.join(out, "media", name)
        os.makedirs(folder, exist_ok=True)
        original = video_to_uint8(clip["video"])
        write_media(os.path.join(folder, "original" + media_suffix(len(original))), original, fps=fps)
        rows = [("original", contact_sheet(original, max_frames=STRIP_FRAMES, gap=2, min_height=64))]
        for label, videos in recons.items():
            frames = video_to_uint8(videos[i])
            write_media(os.path.join(folder, _safe(label) + media_suffix(len(frames))), frames, fps=fps)
            score = results["vaes"][label]["samples"][i]
            caption = f"{label}: PSNR {score['psnr']:.2f} SSIM {score['ssim']:.3f}"
            if "lpips" in score:
                caption += f" LPIPS {score['lpips']:.3f}"
            rows.append((caption, contact_sheet(frames, max_frames=STRIP_FRAMES, gap=2, min_height=64)))
        os.makedirs(os.path.join(out, "strips"), exist_ok=True)
        captioned_rows(rows).save(os.path.join(out, "strips", name + ".png"))


def compare_vaes(vaes: dict, clips: list, out: str, lpips=None, media: int = 4, fps: int = 16,
                 sources: Optional[dict] = None, skipped: Optional[list] = None) -> dict:
    """evaluate_vae for each of `vaes` ({label: WanVAE}) on the same `clips` (megawan.data.eval_clips), written to
    folder `out` (see the module docstring). Returns what results.json holds."""
    if not clips:
        raise ConfigError("no held-out clips to evaluate on (every manifest row was skipped or fills no bucket)")
    os.makedirs(out, exist_ok=True)
    results = {"clips": len({c["id"] for c in clips}), "samples": len(clips), "skipped": list(skipped or []),
               "metrics": {"psnr": "dB, data range 2 ([-1, 1])", "ssim": "gaussian 11 / 1.5, data range 2",
                           "lpips": "VGG lin v0.1" if lpips is not None else "not measured (no weight files)"},
               "vaes": {}}
    recons = {}
    for label, vae in vaes.items():
        result = evaluate_vae(vae, clips, lpips=lpips, keep=media)
        recons[label] = result.pop("reconstructions")
        result["source"] = (sources or {}).get(label)
        result["config"] = vae.vae_config.name
        results["vaes"][label] = result
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    table = format_table(results)
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    _write_media(out, clips[:media], results, recons, fps)
    return results
