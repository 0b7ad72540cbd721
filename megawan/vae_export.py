"""A VAE trained by `megawan train-vae`, out of its checkpoint: the official `.pth` and diffusers' AutoencoderKLWan
folder, with the latent statistics recomputed on a sample of the data. `tools/export_vae.py` is the command line.

    state, cfg = read_trained_vae("runs/vae/checkpoints")             # its latest; EMA weights where it has them
    written = export_vae("runs/vae/checkpoints", "exported", to="both", stats="clips.jsonl", stats_samples=64,
                         stats_buckets=["17x256x256"])

    exported/Wan2.1_VAE.pth      official names (Wan2.2_VAE.pth for a Wan2.2-architecture VAE): what Wan's own code,
    exported/vae_config.json     megawan's loaders and tools take; beside it its config (diffusers' config.json
                                 format), so `--vae-config exported/vae_config.json` gives the architecture and stats
    exported/vae/                diffusers: config.json + diffusion_pytorch_model.safetensors
                                 (`AutoencoderKLWan.from_pretrained("exported/vae")`, or a pipeline's vae/)

Latent statistics: the DiT is trained on latents normalised per channel by `latents_mean` / `latents_std`. A VAE
trained or fine-tuned from scratch has its own: with `stats`, the posterior means of `stats_samples` clips of that
manifest (evenly spread over it, each at the buckets it fills) give the per-channel mean and standard deviation
over every latent position, which replace the run's values in both configs. Without it the run config's values are
written (the preset's, unless the run set them). Precompute records whichever config it is given in the store.

A checkpoint's VAE tensors are `vae.<WanVAE key>` (megawan.training.vae_module), its EMA's `ema.vae.<key>`; the
architecture is the run config's `vae:` section (`preset` + any VAEConfig field). An image_only VAE (the report's
stage 1) has no temporal layers the official / diffusers code could run: it is refused, it is inflated instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from megawan.checkpoint import CheckpointTensors, has_ema, read_run_config, resolve_checkpoint
from megawan.config import ConfigError, VAEConfig, diffusers_vae_config_json, vae_preset
from megawan.config.fields import build
from megawan.convert import convert_state_dict
from megawan.data.eval_clips import eval_clips
from megawan.models.vae import WanVAE
from megawan.training.vae_module import VAE_PREFIX
from megawan.utils.progress import write as write_line

TARGETS = ("official", "diffusers", "both")
CONFIG_FILE = "vae_config.json"  # beside the official .pth: its architecture + latent statistics
DIFFUSERS_DIR = "vae"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_PRESET = "tiny-2.1"  # train-vae's when its config names none
_WRAPPER = "module."  # a DDP-wrapped module's prefix, should a checkpoint have been written through one


def official_name(cfg: VAEConfig) -> str:
    return "Wan2.2_VAE.pth" if cfg.is_residual else "Wan2.1_VAE.pth"


def trained_vae_config(section, where: str = "config.yaml") -> VAEConfig:
    """The VAEConfig of a train-vae run config's `vae:` section: {preset, <VAEConfig fields>} (a preset and its
    overrides), or {name, <every VAEConfig field>} (a VAE that is no preset); neither: train-vae's default preset."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: no `vae:` section (not a train-vae checkpoint?)")
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items() if k in known}
    try:
        if section.get("preset") is None and "name" in section:
            return build(VAEConfig, values, "vae").validate()
        values.pop("name", None)
        return vae_preset(section.get("preset") or DEFAULT_PRESET, **values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_trained_vae(folder: str, ema: Optional[bool] = None) -> tuple:
    """(state dict in WanVAE names, VAEConfig) of a train-vae checkpoint or run root (its latest). ema None: the
    EMA weights when the checkpoint has them; True: they must be there; False: the trained weights."""
    path = resolve_checkpoint(folder)
    cfg = _run_vae_config(path)
    with_ema = has_ema(path) if ema is None else ema
    if with_ema and not has_ema(path):
        raise ConfigError(f"--ema: {path} holds no EMA weights (train.ema_decay was not set)")
    tensors = CheckpointTensors(path, ema=with_ema)
    keys = {}
    for key in tensors.keys():
        name = key[len(_WRAPPER):] if key.startswith(_WRAPPER) else key
        if name.startswith(VAE_PREFIX):
            keys[key] = name[len(VAE_PREFIX):]
    if not keys:
        raise ConfigError(f"{path} holds no {VAE_PREFIX}* tensors: not a train-vae checkpoint")
    loaded = tensors.get_many(list(keys))
    state = {keys[k]: t for k, t in loaded.items()}
    if not cfg.image_only:  # (an image VAE has no key table: no official layout; load_state_dict checks it)
        # the key table of the config: a missing / unknown key or a wrong shape is named here
        state = convert_state_dict(state, "megawan", "megawan", cfg)
    return state, cfg


def _run_vae_config(path: str) -> VAEConfig:
    return trained_vae_config(read_run_config(path).get("vae"), os.path.join(path, "config.yaml"))


def build_vae(state: dict, cfg: VAEConfig, device="cpu") -> WanVAE:
    vae = WanVAE(cfg)
    vae.load_state_dict(state)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def latent_stats(vae: WanVAE, videos) -> tuple:
    """(mean, std) per latent channel of the posterior means of `videos` (each [3, T, H, W] in [-1, 1]) over every
    latent position, accumulated in float64."""
    z = vae.vae_config.z_dim
    total, squares, count = torch.zeros(z, dtype=torch.float64), torch.zeros(z, dtype=torch.float64), 0
    device = next(vae.parameters()).device
    for video in videos:
        mean, _ = vae.encode(video[None].to(device))
        m = mean.double().transpose(0, 1).reshape(z, -1).cpu()
        total += m.sum(1)
        squares += (m * m).sum(1)
        count += m.shape[1]
    if count == 0:
        raise ValueError("no clips to compute the latent statistics from")
    mu = total / count
    std = (squares / count - mu * mu).clamp_min(0).sqrt()
    return tuple(float(v) for v in mu), tuple(float(v) for v in std)


def stats_from_manifest(vae: WanVAE, manifest: str, samples: int, buckets: list, fps: float = 16.0,
                        decode: str = "auto") -> dict:
    """Latent statistics of `samples` rows of `manifest` (see the module docstring): {latents_mean, latents_std,
    clips, skipped}."""
    clips, skipped = eval_clips(manifest, buckets, fps=fps, limit=samples, decode=decode,
                                temporal_stride=vae.vae_config.temporal_stride)
    if not clips:
        raise ConfigError(f"--stats {manifest}: none of its {samples} sampled rows fills a bucket of "
                          f"{' '.join(buckets)} ({len(skipped)} skipped: {skipped[0]['reason'] if skipped else '-'})")
    mean, std = latent_stats(vae, (c["video"] for c in clips))
    return {"latents_mean": mean, "latents_std": std, "samples": len(clips), "rows": len({c["id"] for c in clips}),
            "skipped": skipped}


def _stats_buckets(path: str, given: Optional[list]) -> list:
    if given:
        return list(given)
    buckets = (read_run_config(path).get("data") or {}).get("buckets")
    if not buckets:
        raise ConfigError("--stats-buckets: not given, and the run config names no data.buckets")
    return list(buckets)


def _free(path: str) -> str:
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists already: export into a new folder")
    return path


def export_vae(src: str, out: str, to: str = "both", ema: Optional[bool] = None, stats: Optional[str] = None,
               stats_samples: int = 64, stats_buckets: Optional[list] = None, fps: float = 16.0,
               decode: str = "auto") -> dict:
    """Write the VAE of train-vae checkpoint `src` (a checkpoint or run root) to folder `out` (see the module
    docstring). Returns {"official", "vae_config", "diffusers" (paths, those written), "config": VAEConfig,
    "stats": None or stats_from_manifest's summary}."""
    if to not in TARGETS:
        raise ConfigError(f"--to: {to!r} is not one of {' | '.join(TARGETS)}")
    path = resolve_checkpoint(src)
    run_cfg = _run_vae_config(path)
    if run_cfg.image_only:
        raise ConfigError(f"{src}: vae.image_only: an image VAE (stage 1) has no official / diffusers form; inflate "
                          "it into the 3D VAE and train that (init.inflate), then export")
    targets = ([official_name(run_cfg), CONFIG_FILE] if to != "diffusers" else []) \
        + ([DIFFUSERS_DIR] if to != "official" else [])
    for name in targets:  # all checked before anything is written: no half-written export
        _free(os.path.join(out, name))
    state, cfg = read_trained_vae(path, ema)
    summary = None
    if stats is not None:
        buckets = _stats_buckets(path, stats_buckets)
        summary = stats_from_manifest(build_vae(state, cfg), stats, stats_samples, buckets, fps, decode)
        cfg = dataclasses.replace(cfg, latents_mean=summary["latents_mean"], latents_std=summary["latents_std"])
        write_line(f"latent statistics from {summary['samples']} samples ({summary['rows']} rows) of {stats} "
                   f"({len(summary['skipped'])} rows skipped)")
    os.makedirs(out, exist_ok=True)
    config_json = diffusers_vae_config_json(cfg)
    written = {"official": None, "vae_config": None, "diffusers": None, "config": cfg, "stats": summary}
    if to in ("official", "both"):
        pth = os.path.join(out, official_name(cfg))
        torch.save({k: v.contiguous() for k, v in convert_state_dict(state, "megawan", "official", cfg).items()}, pth)
        written["official"] = pth
        written["vae_config"] = _write_json(os.path.join(out, CONFIG_FILE), config_json)
    if to in ("diffusers", "both"):
        folder = os.path.join(out, DIFFUSERS_DIR)
        os.makedirs(folder)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, DIFFUSERS_WEIGHTS),
                  metadata={"format": "pt"})
        _write_json(os.path.join(folder, "config.json"), config_json)
        written["diffusers"] = folder
    return written


def _write_json(path: str, values: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2)
    return path
