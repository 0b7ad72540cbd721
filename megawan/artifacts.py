"""What a folder on disk holds, and loading it: encoder folders (the Wan-VAE, the umT5 encoder and its
tokenizer, the CLIP image encoder of Wan2.1 I2V / FLF2V when present, in any layout megawan converts:
official Wan, diffusers / transformers, megawan), the preset their
weights fit, and the DiT of a training checkpoint or of a converted megawan pipeline.

    enc = find_encoders("Wan2.1-T2V-14B")                 # paths + the preset each file's weights fit
    vae = load_vae(enc["vae"], vae_config_named(enc["vae_config"]))
    text = load_text_encoder(enc["text_encoder"], text_preset(enc["text_config"]))
    tok = load_tokenizer(enc["tokenizer"], max_length=512)   # folder or spiece.model
    clip = load_clip_encoder(enc["clip"], clip_preset(enc["clip_config"]))   # enc["clip"] is None without one
    found = resolve_model("runs/stage3/checkpoints")      # {"config": DiTConfig, "experts": {...}, ...}
    dit = load_dit(found["experts"]["transformer"], found["config"])   # current TP / CP layout, EMA weights

A weight file's layout is recognised from its keys: the first layout whose key table the file matches exactly.
A converted megawan pipeline is a folder marked by megawan_pipeline.json (written by megawan.export).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import torch
from megatron.core import parallel_state as ps

from megawan.checkpoint import has_ema, load_weights, read_run_config, resolve_checkpoint
from megawan.config import (
    CLIPConfig,
    DiTConfig,
    ParallelConfig,
    TextConfig,
    VAEConfig,
    clip_preset,
    config_to_dict,
    text_preset,
    vae_preset,
)
from megawan.convert import convert_state_dict, load_state_dict_file
from megawan.models.clip import CLIPVisionEncoder
from megawan.models.text import UMT5Encoder, UMT5Tokenizer
from megawan.models.vae import WanVAE
from megawan.models.dit.parallelize import build_model_chunks
from megawan.models.state import dtype_name

PIPELINE_FILE = "megawan_pipeline.json"  # marks a converted megawan pipeline
PIPELINE_FORMAT, PIPELINE_VERSION = "megawan-pipeline", 1
VAE_LAYOUTS = ("megawan", "official")  # megawan's VAE names are diffusers' AutoencoderKLWan names
TEXT_LAYOUTS = ("megawan", "official", "transformers")
VAE_PRESETS = ("wan2.1", "wan2.2", "tiny-2.1", "tiny-2.2")  # tried in this order
TEXT_PRESETS = ("umt5-xxl", "tiny")
CLIP_LAYOUTS = ("megawan", "official", "transformers")  # official: models_clip_*.pth (only its visual.* is read)
CLIP_PRESETS = ("open-clip-xlm-roberta-large-vit-huge-14", "tiny")


# ----------------------------------------------------------------------------------------------
# Encoder weights in any layout


def to_megawan(state_dict: dict, config, layouts: tuple, what: str, path: str = "") -> tuple:
    """(state dict in megawan names, the layout it came in). Errors list why each layout did not fit."""
    errors = []
    for layout in layouts:
        try:
            return convert_state_dict(state_dict, layout, "megawan", config), layout
        except (ValueError, KeyError) as e:
            errors.append(f"  as {layout}: {str(e).splitlines()[0][:300]}")
    raise ValueError(f"{path or 'state dict'} is not a {what} for config {config.name!r} in any known layout:\n"
                     + "\n".join(errors))


def load_vae(path: str, config: VAEConfig, device="cpu", dtype: torch.dtype | None = None) -> WanVAE:
    state, _ = to_megawan(load_state_dict_file(path), config, VAE_LAYOUTS, "Wan-VAE", path)
    vae = WanVAE(config)
    vae.load_state_dict(state)
    if dtype is not None:
        vae.to(dtype)
    return vae.to(device).eval().requires_grad_(False)


def _load_sharded_encoder(cls, path: str, config, layouts: tuple, what: str, device, dtype, tp_group):
    """An encoder built on `device` in `dtype` (default: the config's), tensor-parallel over `tp_group` when
    given (each rank keeps its shard), filled from the file in any of `layouts`."""
    state, _ = to_megawan(load_state_dict_file(path), config, layouts, what, path)
    if dtype is not None:
        config = dataclasses.replace(config, params_dtype=dtype_name(dtype))
    encoder = cls(config, tp_group=tp_group, device=device)
    size = encoder.tp_group.size()
    if size > 1:
        state = convert_state_dict(state, "megawan", "megawan", config, tp_size=size)[encoder.tp_group.rank()]
    encoder.load_state_dict(state)  # copies into the encoder's device and dtype
    return encoder.eval().requires_grad_(False)


def load_text_encoder(path: str, config: TextConfig, device="cpu", dtype: torch.dtype | None = None,
                      tp_group=None) -> UMT5Encoder:
    """The umT5 encoder (tensor-parallel over `tp_group` when given: each rank keeps its shard), built on `device`
    in `dtype` (default: the config's) and filled from the file: umT5-XXL never exists in fp32 on a GPU."""
    return _load_sharded_encoder(UMT5Encoder, path, config, TEXT_LAYOUTS, "umT5 encoder", device, dtype, tp_group)


def load_clip_encoder(path: str, config: CLIPConfig, device="cpu", dtype: torch.dtype | None = None,
                      tp_group=None) -> CLIPVisionEncoder:
    """The CLIP image encoder (tensor-parallel over `tp_group` when given), built on `device` in `dtype` (default:
    the config's) and filled from the file: the official models_clip_*.pth (its text tower is not read),
    transformers' CLIPVisionModel weights or megawan's."""
    return _load_sharded_encoder(CLIPVisionEncoder, path, config, CLIP_LAYOUTS, "CLIP image encoder", device, dtype,
                                 tp_group)


def load_tokenizer(path: str, max_length: int = 512) -> UMT5Tokenizer:
    """A sentencepiece model file, or a folder holding spiece.model (google/umt5-xxl as Wan ships it)."""
    if os.path.isdir(path):
        for name in ("spiece.model", "tokenizer.model", "spm.model"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path} holds no sentencepiece model (spiece.model)")
    return UMT5Tokenizer(path, max_length=max_length)


def _detect(state: dict, presets: list, kind: str, path: str, layouts: tuple) -> str:
    """The first preset whose key table and shapes `state` fits (any layout)."""
    errors = []
    for name, cfg in presets:
        try:
            to_megawan(state, cfg, layouts, kind, path)
            return name
        except ValueError as e:
            errors.append(f"{name}: {str(e).splitlines()[-1][:200]}")
    raise ValueError(f"{path} is not a {kind} of any known preset ({'; '.join(errors)})")


def detect_vae_preset(state: dict, path: str = "") -> str:
    return _detect(state, [(n, vae_preset(n)) for n in VAE_PRESETS], "vae", path, VAE_LAYOUTS)


def detect_text_preset(state: dict, path: str = "") -> str:
    return _detect(state, [(n, text_preset(n)) for n in TEXT_PRESETS], "text", path, TEXT_LAYOUTS)


def detect_clip_preset(state: dict, path: str = "") -> str:
    """The CLIP preset whose tower `state` holds (official, transformers or megawan names)."""
    return _detect(state, [(n, clip_preset(n)) for n in CLIP_PRESETS], "CLIP image encoder", path, CLIP_LAYOUTS)


def find_encoders(folder: str) -> dict:
    """The encoder files of a folder in the official layout (Wan2.x_VAE.pth, models_t5_umt5-*.pth, a
    tokenizer folder, for Wan2.1 I2V / FLF2V models_clip_*.pth) or megawan's (vae.safetensors,
    text_encoder.safetensors, tokenizer/, image_encoder.safetensors): paths and the preset each one's weights fit.
    A `vae_config.json` beside the VAE (tools/export_vae.py writes one: the statistics recomputed on the data)
    makes vae_config its path instead of a preset name (megawan.config.vae_files.vae_config_named reads either).
    Keys: vae, vae_config, text_encoder, text_config, tokenizer, clip, clip_config (the last two None when the
    folder holds no CLIP image encoder)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no encoder folder at {folder}")
    names = sorted(os.listdir(folder))

    def pick(patterns, what, required=True):
        for pattern in patterns:
            for n in names:
                if re.fullmatch(pattern, n) and os.path.isfile(os.path.join(folder, n)):
                    return os.path.join(folder, n)
        if required:
            raise FileNotFoundError(f"{folder} holds no {what} (looked for {', '.join(patterns)})")
        return None

    vae = pick([r"vae\.safetensors", r"Wan2\.\d_VAE\.pth", r".*vae.*\.(pth|safetensors)"], "Wan-VAE weights")
    text = pick([r"text_encoder\.safetensors", r"models_t5_umt5.*\.pth", r".*umt5.*\.(pth|safetensors)"],
                "umT5 encoder weights")
    tokenizer = None
    for candidate in ("tokenizer", os.path.join("google", "umt5-xxl"), "umt5-tokenizer"):
        if os.path.isdir(os.path.join(folder, candidate)):
            tokenizer = os.path.join(folder, candidate)
            break
    if tokenizer is None:
        raise FileNotFoundError(f"{folder} holds no tokenizer folder (tokenizer/, google/umt5-xxl/)")
    clip = pick([r"image_encoder\.safetensors", r"models_clip_.*\.pth", r".*clip.*\.(pth|safetensors)"],
                "CLIP image encoder", required=False)
    # presets from names and shapes only: the files are mapped, not read (umT5-XXL is 11 GB)
    vae_config = detect_vae_preset(load_state_dict_file(vae, mmap=True), vae)
    trained = os.path.join(folder, "vae_config.json")  # a trained VAE's export: its own latents_mean / latents_std
    if os.path.isfile(trained):
        vae_config = trained
    return {"vae": vae, "vae_config": vae_config,
            "text_encoder": text, "text_config": detect_text_preset(load_state_dict_file(text, mmap=True), text),
            "tokenizer": tokenizer, "clip": clip,
            "clip_config": None if clip is None else detect_clip_preset(load_state_dict_file(clip, mmap=True), clip)}


# ----------------------------------------------------------------------------------------------
# Converted megawan pipelines


def _dit_config(values: dict) -> DiTConfig:
    return DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def write_pipeline_file(folder: str, config: DiTConfig, experts: dict, vae: str, vae_config: str,
                        text_encoder: str, text_config: str, tokenizer: str, clip: Optional[str] = None,
                        clip_config: Optional[str] = None) -> None:
    """Mark `folder` as a megawan pipeline. experts: {expert: its checkpoint folder}; every path relative to
    `folder`; vae_config / text_config / clip_config: the encoders' preset names (clip: None without one)."""
    meta = {"format": PIPELINE_FORMAT, "version": PIPELINE_VERSION, "model": config_to_dict(config),
            "transformer": dict(experts), "vae": vae, "vae_config": vae_config, "text_encoder": text_encoder,
            "text_config": text_config, "tokenizer": tokenizer, "clip": clip, "clip_config": clip_config}
    with open(os.path.join(folder, PIPELINE_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def read_pipeline_file(folder: str) -> Optional[dict]:
    """What a megawan pipeline's marker says (paths made absolute, "model" a DiTConfig); None when `folder`
    is not a megawan pipeline."""
    marker = os.path.join(folder, PIPELINE_FILE)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        meta = json.load(f)
    meta["model"] = _dit_config(meta["model"])
    meta["transformer"] = {k: os.path.join(folder, v) for k, v in meta["transformer"].items()}
    meta.setdefault("clip", None)  # pipelines written before the CLIP encoder travelled with them
    meta.setdefault("clip_config", None)
    for key in ("vae", "text_encoder", "tokenizer", "clip"):
        if meta[key] is not None:
            meta[key] = os.path.join(folder, meta[key])
    return meta


# ----------------------------------------------------------------------------------------------
# The DiT of a checkpoint or a pipeline


def resolve_model(ckpt: str, low_noise_ckpt: Optional[str] = None) -> dict:
    """What to load: {"config": DiTConfig, "experts": {name: checkpoint folder}, "encoders": folder|None,
    "null_text": bool (trained with text dropout: zero states are its unconditional input)}. `ckpt` is a
    converted megawan pipeline, a checkpoint, or a run's checkpoint root (its latest)."""
    pipeline = read_pipeline_file(ckpt)
    if pipeline is not None:
        return {"config": pipeline["model"], "experts": pipeline["transformer"], "encoders": ckpt,
                "null_text": False}
    path = resolve_checkpoint(ckpt)
    run = read_run_config(path)
    model = _dit_config(run["model"])
    null_text = float(run.get("train", {}).get("text_dropout", 0.0) or 0.0) > 0
    if model.expert_boundary is not None:
        if low_noise_ckpt is None:
            raise ValueError(f"{model.name} is a two-expert model: --ckpt is the high-noise expert's "
                             "checkpoint, --low-noise-ckpt the low-noise one's")
        return {"config": model, "experts": {"high_noise": path, "low_noise": resolve_checkpoint(low_noise_ckpt)},
                "encoders": None, "null_text": null_text}
    if low_noise_ckpt is not None:
        raise ValueError(f"--low-noise-ckpt given, but {model.name} has a single expert")
    return {"config": model, "experts": {"transformer": path}, "encoders": None, "null_text": null_text}


def load_dit(path: str, config: DiTConfig, use_ema: bool = True, device=None):
    """The DiT of checkpoint `path` in the current TP / CP layout (PP = 1), EMA weights when it holds them, built
    on `device` (default: this rank's)."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("generation splits a model over tensor and context parallel ranks, not pipeline stages")
    (model,) = build_model_chunks(config, ParallelConfig(tensor_parallel=ps.get_tensor_model_parallel_world_size()),
                                  device=device)
    load_weights(path, [model], ema=use_ema and has_ema(path))
    return model.eval().requires_grad_(False)
