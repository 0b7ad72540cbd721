"""Whole pipelines between the three layouts: the DiT (both A14B experts), the Wan-VAE, the umT5 encoder,
the tokenizer, the CLIP image encoder (Wan2.1 I2V / FLF2V) and the configs. `tools/convert_checkpoint.py` is the
command line.

    official   as Wan-Video ships it: config.json + diffusion_pytorch_model*.safetensors (+ .index.json), or
               high_noise_model/ + low_noise_model/ for A14B; Wan2.x_VAE.pth; models_t5_umt5-*-enc*.pth;
               google/umt5-xxl/ (the tokenizer); models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (only
               its visual tower is read, and only that is written back: Wan's own loader wants the text tower too)
    diffusers  what `diffusers.WanPipeline.from_pretrained` loads (`WanImageToVideoPipeline` for I2V models):
               model_index.json, transformer/ (+ transformer_2/), vae/, text_encoder/, tokenizer/, scheduler/,
               with a CLIP image_encoder/ (transformers' CLIPVisionModel) + image_processor/ (CLIPImageProcessor)
    megawan    a megawan pipeline (megawan.artifacts' marker file); transformer/ (or high_noise_model/ +
               low_noise_model/): weights-only checkpoints (megawan.checkpoint) written at the requested TP x PP
               (loadable at any layout, and by `megawan train --init-from`); vae.safetensors,
               text_encoder.safetensors, image_encoder.safetensors (megawan names); tokenizer/. A training
               checkpoint (+ --encoders) is a megawan source too.

The DiT streams: tensors are read one at a time (safetensors' lazy reader, dist_checkpointing's partial load)
and written shard by shard, so converting a 14B model never holds two copies of it. A megawan destination is
written by TP x PP processes (gloo), each holding only its own slice. Tensors are renamed, split or
concatenated only, never cast: bf16 stays bf16 and round trips are bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state as ps
from safetensors.torch import save_file

from megawan.artifacts import (
    CLIP_LAYOUTS,
    TEXT_LAYOUTS,
    VAE_LAYOUTS,
    detect_clip_preset,
    detect_text_preset,
    detect_vae_preset,
    find_encoders,
    resolve_model,
    to_megawan,
    write_pipeline_file,
)
import megawan.checkpoint as checkpoint_files
from megawan.checkpoint import CheckpointTensors, has_ema, read_run_config, read_trainer_state, resolve_checkpoint, \
    save_model_checkpoint
from megawan.config import (
    DiTConfig,
    ParallelConfig,
    clip_config_from,
    clip_image_processor_json,
    clip_preset,
    config_to_dict,
    diffusers_config_json,
    diffusers_vae_config_json,
    dit_config_from,
    dit_preset,
    official_config_json,
    text_preset,
    transformers_clip_config_json,
    transformers_config_json,
    vae_preset,
)
from megawan.config.vae_files import vae_config_named
from megawan.convert import (
    SafetensorsDir,
    convert_state_dict,
    load_safetensors_folder,
    load_state_dict_file,
    split_tensor_parallel,
)
from megawan.convert.dit_keys import TP_AXIS, dit_key_table, dit_param_shapes
from megawan.diffusion.defaults import diffusers_scheduler_config_json
from megawan.lora.formats import MergedSource, check_shapes, lora_from_checkpoint, read_lora_file, write_lora_file
from megawan.models.dit.parallelize import build_model_chunks, chunk_state_dict
from megawan.parallel.launch import spawn_local
from megawan.utils.progress import Progress, write as write_line

FORMATS = ("official", "diffusers", "megawan")
SHARD_BYTES = 5 * 1024 ** 3  # official / diffusers shard size (bytes), as the Hub files are cut
_EXPERT_DIRS = {  # expert -> folder, per format
    "official": {"high_noise": "high_noise_model", "low_noise": "low_noise_model", "transformer": ""},
    "diffusers": {"high_noise": "transformer", "low_noise": "transformer_2", "transformer": "transformer"},
    "megawan": {"high_noise": "high_noise_model", "low_noise": "low_noise_model", "transformer": "transformer"},
}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ----------------------------------------------------------------------------------------------
# Reading DiT tensors


def _dit_source(path: str, fmt: str, ema: bool = False, cfg: Optional[DiTConfig] = None, loras: tuple = ()):
    """One expert's tensors, read one at a time: a checkpoint folder (megawan) or sharded safetensors; with
    `loras` ((LoRA file, scale) pairs) the adapted weights come merged (W += scale alpha / rank B A)."""
    source = CheckpointTensors(path, ema=ema) if fmt == "megawan" else SafetensorsDir(path)
    if not loras:
        return source
    rename, _ = _renamer(cfg, fmt, "megawan")
    return MergedSource(source, rename, dit_param_shapes(cfg), [(read_lora_file(f), s) for f, s in loras])


# ----------------------------------------------------------------------------------------------
# LoRA training checkpoints (the adapters alone, beside the base they were trained on)


def lora_base(path: str) -> Optional[str]:
    """The base checkpoint of LoRA training checkpoint `path` (trainer_state.json's lora_base), checked against
    the fingerprint recorded at training time where megawan.checkpoint computes one; None: not a LoRA checkpoint."""
    base = read_trainer_state(path).get("lora_base")
    if not base:
        return None
    folder = base["path"]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} is a LoRA checkpoint whose base {folder} is gone (trainer_state.json "
                                "lora_base.path)")
    fingerprint = getattr(checkpoint_files, "weights_fingerprint", None)
    if fingerprint is not None and base.get("fingerprint") and fingerprint(folder) != base["fingerprint"]:
        raise ValueError(f"{path}: its base {folder} changed since the LoRA was trained (weights fingerprint "
                         "differs): the adapters were trained on other weights")
    return folder


def read_lora_checkpoint(path: str, ema: bool = False):
    """The adapters of LoRA training checkpoint `path` (its EMA's with ema=True) as a LoRAFile, with the rank and
    alpha of its run config's `lora:` section."""
    section = read_run_config(path).get("lora") or {}
    return lora_from_checkpoint(CheckpointTensors(path, ema=ema), section, origin=path)


def export_lora_checkpoint(src: str, out: str, fmt: str = "diffusers", ema: bool = False) -> str:
    """Write the adapters of a LoRA training checkpoint (or a run's checkpoint root: its latest) as a LoRA file."""
    path = resolve_checkpoint(src)
    if ema and not has_ema(path):
        raise ValueError(f"--ema: {path} holds no EMA weights")
    lora = read_lora_checkpoint(path, ema)
    return write_lora_file(dict(lora), None, out, fmt)


def _renamer(config: DiTConfig, src: str, dst: str):
    """(src key -> dst key, src key -> expected shape) for every parameter; unknown / missing keys named."""
    layouts = ("megawan", "official", "diffusers")
    si, di = layouts.index(src), layouts.index(dst)
    shapes = dit_param_shapes(config)
    table = dit_key_table(config)
    return {r[si]: r[di] for r in table}, {r[si]: shapes[r[0]] for r in table}


def stream_dit(source, config: DiTConfig, src: str, dst: str) -> Iterator:
    """(dst key, tensor) for every DiT parameter of `source`, checking every key and shape against `config`."""
    rename, shapes = _renamer(config, src, dst)
    keys = [k for k in source.keys() if not k.endswith("_extra_state")]
    if src == "diffusers":
        keys = [k for k in keys if ".norm_added_q." not in k]  # an unused key of some diffusers Wan files
    unknown = [k for k in keys if k not in rename]
    if unknown:
        raise KeyError(f"{len(unknown)} {src} key(s) do not belong to a {config.name} DiT, e.g. {unknown[0]!r}")
    missing = [k for k in rename if k not in set(keys)]
    if missing:
        raise KeyError(f"{len(missing)} {src} key(s) missing for a {config.name} DiT, e.g. {missing[0]!r}")
    for key in keys:
        tensor = source.get(key)
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(f"{src} key {key!r} has shape {tuple(tensor.shape)}, expected {shapes[key]} "
                             f"for {config.name}")
        yield rename[key], tensor


# ----------------------------------------------------------------------------------------------
# Writing DiT tensors


def write_safetensors_shards(tensors: Iterator, folder: str, stem: str = "diffusion_pytorch_model",
                             max_shard_bytes: int = SHARD_BYTES) -> list:
    """Write (key, tensor) pairs into shards of at most max_shard_bytes as they come (one shard in memory);
    several shards get the Hub's names and an index.json. Returns the files."""
    os.makedirs(folder, exist_ok=True)
    parts, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            tmp = os.path.join(folder, f".{stem}.part{len(parts)}.safetensors")
            save_file({k: v.contiguous() for k, v in current.items()}, tmp)
            parts.append((tmp, list(current), size))
            current, size = {}, 0

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[key] = tensor
        size += nbytes
    flush()
    if len(parts) == 1:
        final = [os.path.join(folder, f"{stem}.safetensors")]
        os.replace(parts[0][0], final[0])
        return final
    final, weight_map = [], {}
    for i, (tmp, keys, _) in enumerate(parts):
        name = f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(tmp, os.path.join(folder, name))
        final.append(os.path.join(folder, name))
        weight_map.update({k: name for k in keys})
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": sum(p[2] for p in parts)}, "weight_map": weight_map}, f, indent=2)
    return final


def _write_megawan_rank(rank: int, src_path: str, src_format: str, ema: bool, cfg: DiTConfig,
                        dst: str, tp: int, pp: int, converted: dict, loras: tuple = ()) -> None:
    """One rank of a TP x PP world: build its model chunk, fill it from the source (only its own tensors,
    its TP slice of each; LoRAs merged), save the whole model as a weights-only checkpoint (collective)."""
    source = _dit_source(src_path, src_format, ema, cfg, loras)
    first = next(iter(source.keys()))
    model_cfg = dataclasses.replace(cfg, params_dtype=_DTYPE_NAMES[source.get(first).dtype])
    # on the CPU: the ranks are spawn_local's gloo processes, and a conversion moves tensors between files
    chunks = build_model_chunks(model_cfg, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), device="cpu")
    tp_rank = ps.get_tensor_model_parallel_rank()
    (chunk,) = chunks
    owned = set(chunk.layers)

    def wanted(key: str) -> bool:
        if key.startswith("blocks."):
            return int(key.split(".")[1]) in owned
        return True

    local = {}
    rename, shapes = _renamer(cfg, src_format, "megawan")
    for src_key in source.keys():
        key = rename.get(src_key)
        if key is None or not wanted(key):
            continue
        tensor = source.get(src_key)
        if tuple(tensor.shape) != shapes[src_key]:
            raise ValueError(f"{src_format} key {src_key!r} has shape {tuple(tensor.shape)}, expected "
                             f"{shapes[src_key]} for {cfg.name}")
        local[key] = split_tensor_parallel({key: tensor}, tp, TP_AXIS)[tp_rank][key] if tp > 1 else tensor
    state = chunk_state_dict(local, chunk)
    own = {k for k in chunk.state_dict() if not k.endswith("_extra_state")}
    if set(state) != own:
        raise KeyError(f"rank {rank}: the source lacks {sorted(own - set(state))[:3]} for its part of the model")
    with torch.no_grad():
        chunk.load_state_dict(state, strict=False)
    save_model_checkpoint(dst, chunks, {"model": config_to_dict(cfg)}, converted)


def _write_megawan(path: str, src_format: str, ema: bool, cfg: DiTConfig, folder: str, tp: int, pp: int,
                   loras: tuple = ()) -> None:
    converted = {"step": 0, "converted_from": src_format, "layout": {"tensor_parallel": tp, "pipeline_parallel": pp}}
    if loras:
        converted["merged_lora"] = [{"file": os.path.abspath(f), "scale": s} for f, s in loras]
    spawn_local(_write_megawan_rank, world_size=tp * pp, tensor_parallel=tp, pipeline_parallel=pp,
                args=(path, src_format, ema, cfg, folder, tp, pp, converted, tuple(loras)))


# ----------------------------------------------------------------------------------------------
# Pipelines


def read_pipeline(src: str, fmt: str, model: Optional[str] = None, encoders: Optional[str] = None,
                  ema: bool = False, boundary: Optional[float] = None) -> dict:
    """What a source pipeline holds: {"config", "experts": {name: (path, read EMA weights)}, "vae_config",
    "text_config", "vae_state", "text_state", "tokenizer", "clip_config", "clip_state"}; encoder states in megawan
    names (clip_*: None without a CLIP image encoder)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    out = {"experts": {}}
    if fmt == "official":
        experts = {e: os.path.join(src, d) for e, d in _EXPERT_DIRS["official"].items()
                   if e != "transformer" and os.path.isdir(os.path.join(src, d))} or {"transformer": src}
        with open(os.path.join(next(iter(experts.values())), "config.json"), encoding="utf-8") as f:
            config_json = json.load(f)
        weights = SafetensorsDir(next(iter(experts.values())))
        cfg = dit_config_from(config_json, state_dict_keys=weights.keys())
        if cfg.image_dim is not None:  # config.json does not say how wide the CLIP tokens are: the weights do
            image = {"image_dim": weights.get("img_emb.proj.0.weight").shape[0]}
            if cfg.image_pos_len is not None:  # FLF2V's image positions (two frames' tokens)
                image["image_pos_len"] = weights.get("img_emb.emb_pos").shape[1]
            cfg = dataclasses.replace(cfg, **image)
        out["experts"] = {e: (p, False) for e, p in experts.items()}
        enc_folder = encoders or src
    elif fmt == "diffusers":
        with open(os.path.join(src, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        with open(os.path.join(src, "transformer", "config.json"), encoding="utf-8") as f:
            cfg = dit_config_from(json.load(f))
        two = os.path.isdir(os.path.join(src, "transformer_2")) and (index.get("transformer_2") or [None])[0]
        out["experts"] = ({"high_noise": (os.path.join(src, "transformer"), False),
                           "low_noise": (os.path.join(src, "transformer_2"), False)} if two
                          else {"transformer": (os.path.join(src, "transformer"), False)})
        if two and index.get("boundary_ratio") is not None:
            cfg = dataclasses.replace(cfg, expert_boundary=float(index["boundary_ratio"]))
        enc_folder = None
    else:  # megawan pipeline, or a training checkpoint (+ --encoders)
        found = resolve_model(src)
        cfg = found["config"]
        out["experts"] = {e: (p, ema) for e, p in found["experts"].items()}
        enc_folder = encoders or found["encoders"]
    if model is not None:  # the preset the user names: its hyper-parameters, checked against the weights
        named = dit_preset(model)
        cfg = dataclasses.replace(named, params_dtype=cfg.params_dtype, expert_boundary=named.expert_boundary)
    if boundary is not None:  # official A14B folders do not record it (it lives in Wan's python configs)
        cfg = dataclasses.replace(cfg, expert_boundary=float(boundary))
    out["config"] = cfg
    if fmt == "diffusers":
        out.update(_read_diffusers_encoders(src))
    else:
        if enc_folder is None:
            raise ValueError("no encoders: pass --encoders FOLDER (VAE, umT5 weights, tokenizer)")
        out.update(_read_encoders(enc_folder))
    return out


def _read_encoders(folder: str) -> dict:
    enc = find_encoders(folder)
    vae_state, _ = to_megawan(load_state_dict_file(enc["vae"]), vae_config_named(enc["vae_config"]), VAE_LAYOUTS,
                              "Wan-VAE")
    text_state, _ = to_megawan(load_state_dict_file(enc["text_encoder"]), text_preset(enc["text_config"]),
                               TEXT_LAYOUTS, "umT5 encoder")
    clip_state = None
    if enc["clip"] is not None:
        clip_state, _ = to_megawan(load_state_dict_file(enc["clip"]), clip_preset(enc["clip_config"]), CLIP_LAYOUTS,
                                   "CLIP image encoder", enc["clip"])
    return {"vae_config": enc["vae_config"], "text_config": enc["text_config"], "vae_state": vae_state,
            "text_state": text_state, "tokenizer": enc["tokenizer"], "clip_config": enc["clip_config"],
            "clip_state": clip_state}


def _read_diffusers_encoders(src: str) -> dict:
    vae_sd = load_safetensors_folder(os.path.join(src, "vae"))
    vae_name = detect_vae_preset(vae_sd, os.path.join(src, "vae"))
    text_sd = load_safetensors_folder(os.path.join(src, "text_encoder"))
    text_name = detect_text_preset(text_sd, os.path.join(src, "text_encoder"))
    clip_name, clip_state = _read_diffusers_clip(os.path.join(src, "image_encoder"))
    return {"vae_config": vae_name, "text_config": text_name,
            "vae_state": convert_state_dict(vae_sd, "megawan", "megawan", vae_preset(vae_name)),
            "text_state": convert_state_dict(text_sd, "transformers", "megawan", text_preset(text_name)),
            "tokenizer": os.path.join(src, "tokenizer"), "clip_config": clip_name, "clip_state": clip_state}


def _read_diffusers_clip(folder: str) -> tuple:
    """(preset name, megawan state) of a diffusers image_encoder/ (transformers' CLIPVisionModel); (None, None)
    without one. Its config.json must agree with the preset the weights fit (activation, epsilon)."""
    if not os.path.isdir(folder):
        return None, None
    sd = load_safetensors_folder(folder)
    name = detect_clip_preset(sd, folder)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        found = clip_config_from(json.load(f))
    expected = clip_preset(name)
    for field in ("hidden_act", "layer_norm_eps", "num_hidden_layers", "patch_size", "image_size"):
        if getattr(found, field) != getattr(expected, field):
            raise ValueError(f"{folder}/config.json: {field}={getattr(found, field)!r}, but the weights are the "
                             f"{name} CLIP encoder, which has {field}={getattr(expected, field)!r}")
    return name, convert_state_dict(sd, "transformers", "megawan", expected)


def convert_pipeline(src: str, src_format: str, dst: str, dst_format: str, model: Optional[str] = None,
                     tp: int = 1, pp: int = 1, encoders: Optional[str] = None, ema: bool = False,
                     max_shard_bytes: int = SHARD_BYTES, boundary: Optional[float] = None, loras: tuple = (),
                     progress: bool = False) -> dict:
    """Convert the pipeline at `src` into `dst` (a new folder). loras: (LoRA file, scale) pairs merged into the
    DiT's weights on the way. progress: a line per DiT tensor streamed (a bar on a terminal), per expert for a
    megawan destination (its ranks read their own tensors). Returns a summary of what was written."""
    if dst_format not in FORMATS:
        raise ValueError(f"--dst-format {dst_format!r} is not one of {FORMATS}")
    if os.path.exists(dst) and os.listdir(dst):
        raise FileExistsError(f"{dst} exists and is not empty: choose a new destination")
    if (tp > 1 or pp > 1) and dst_format != "megawan":
        raise ValueError("--tp / --pp lay out a megawan destination; official and diffusers files are unsharded")
    pipe = read_pipeline(src, src_format, model, encoders, ema, boundary)
    cfg = pipe["config"]
    cfg.validate(tensor_parallel=tp)
    if cfg.num_layers % pp:
        raise ValueError(f"--pp {pp} does not divide the {cfg.num_layers} layers of {cfg.name}")
    os.makedirs(dst, exist_ok=True)
    tmp = dst.rstrip("/") + ".converting"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    experts = pipe["experts"]
    if len(experts) == 2 and cfg.expert_boundary is None:
        raise ValueError("two experts but no boundary: name the preset with --model (e.g. wan2.2-t2v-a14b) or "
                         "give --boundary")
    if loras and len(experts) == 2:
        raise ValueError("--merge-lora: two-expert (A14B) models take one LoRA per expert, which this tool does not "
                         "do yet; merge into a single expert's weights")
    for f, _ in loras:  # a LoRA that does not fit is named before anything is written
        check_shapes(read_lora_file(f), dit_param_shapes(cfg), cfg.name)
    for expert, (path, expert_ema) in experts.items():
        sub = _EXPERT_DIRS[dst_format][expert]
        folder = os.path.join(tmp, sub) if sub else tmp
        bar = Progress(len(dit_param_shapes(cfg)), desc=f"DiT {expert} -> {dst_format}", unit="tensors",
                       enabled=progress)
        if dst_format == "megawan":
            _write_megawan(path, src_format, expert_ema, cfg, folder, tp, pp, loras)
            bar.update(bar.total)
        else:
            source = _dit_source(path, src_format, expert_ema, cfg, loras)
            write_safetensors_shards(_counted(stream_dit(source, cfg, src_format, dst_format), bar), folder,
                                     max_shard_bytes=max_shard_bytes)
            config_json = official_config_json(cfg) if dst_format == "official" else diffusers_config_json(cfg)
            with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config_json, f, indent=2)
        bar.close()
    if progress:
        write_line("writing the VAE, umT5, tokenizer" + (" and CLIP" if pipe.get("clip_state") else ""))
    vae_cfg, text_cfg = vae_config_named(pipe["vae_config"]), text_preset(pipe["text_config"])
    vae_out = convert_state_dict(pipe["vae_state"], "megawan", "megawan" if dst_format != "official" else "official",
                                 vae_cfg)
    text_layout = {"official": "official", "diffusers": "transformers", "megawan": "megawan"}[dst_format]
    text_out = convert_state_dict(pipe["text_state"], "megawan", text_layout, text_cfg)
    clip_cfg = _clip_for(cfg, pipe)
    _write_encoders(tmp, dst_format, cfg, vae_cfg, vae_out, text_cfg, text_out, pipe["tokenizer"], experts, clip_cfg)
    if clip_cfg is not None:
        _write_clip(tmp, dst_format, clip_cfg, pipe["clip_state"])
    for name in os.listdir(tmp):  # complete: move into place
        os.replace(os.path.join(tmp, name), os.path.join(dst, name))
    os.rmdir(tmp)
    return {"config": cfg.name, "experts": sorted(experts), "dst": dst, "format": dst_format, "tp": tp, "pp": pp}


def _counted(tensors: Iterator, bar: Progress) -> Iterator:
    for item in tensors:
        yield item
        bar.update(1)


def _clip_for(cfg: DiTConfig, pipe: dict):
    """The CLIP config that travels with the pipeline (None without one); its width must be the DiT's image_dim."""
    if pipe.get("clip_state") is None:
        return None
    clip_cfg = clip_preset(pipe["clip_config"])
    if cfg.image_dim is None:
        print(f"note: {cfg.name} does not condition on CLIP (no image_dim); the CLIP encoder is left out", flush=True)
        return None
    if cfg.image_dim != clip_cfg.hidden_size:
        raise ValueError(f"the CLIP encoder ({clip_cfg.name}) is {clip_cfg.hidden_size} wide, but the DiT's "
                         f"image_dim is {cfg.image_dim}")
    return clip_cfg


def _write_clip(folder: str, fmt: str, clip_cfg, state: dict) -> None:
    """official: models_clip_<preset>.pth (visual.* only); megawan: image_encoder.safetensors; diffusers:
    image_encoder/ (CLIPVisionModel) + image_processor/ (CLIPImageProcessor with Wan's size, mean and std)."""
    if fmt == "official":
        out = convert_state_dict(state, "megawan", "official", clip_cfg)
        torch.save(out, os.path.join(folder, f"models_clip_{clip_cfg.name}.pth"))
    elif fmt == "megawan":
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "image_encoder.safetensors"))
    else:
        out = convert_state_dict(state, "megawan", "transformers", clip_cfg)
        os.makedirs(os.path.join(folder, "image_encoder"))
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(folder, "image_encoder",
                                                                            "model.safetensors"))
        with open(os.path.join(folder, "image_encoder", "config.json"), "w", encoding="utf-8") as f:
            json.dump(transformers_clip_config_json(clip_cfg), f, indent=2)
        os.makedirs(os.path.join(folder, "image_processor"))
        with open(os.path.join(folder, "image_processor", "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(clip_image_processor_json(clip_cfg), f, indent=2)


def _write_encoders(folder, fmt, cfg, vae_cfg, vae_sd, text_cfg, text_sd, tokenizer, experts, clip_cfg) -> None:
    if fmt == "official":
        vae_name = "Wan2.2_VAE.pth" if vae_cfg.is_residual else "Wan2.1_VAE.pth"
        torch.save(vae_sd, os.path.join(folder, vae_name))
        size = "xxl" if text_cfg.name == "umt5-xxl" else text_cfg.name
        bf16 = next(iter(text_sd.values())).dtype == torch.bfloat16
        torch.save(text_sd, os.path.join(folder, f"models_t5_umt5-{size}-enc{'-bf16' if bf16 else ''}.pth"))
        shutil.copytree(tokenizer, os.path.join(folder, "google", "umt5-xxl"))
        return
    if fmt == "megawan":
        save_file({k: v.contiguous() for k, v in vae_sd.items()}, os.path.join(folder, "vae.safetensors"))
        save_file({k: v.contiguous() for k, v in text_sd.items()}, os.path.join(folder, "text_encoder.safetensors"))
        shutil.copytree(tokenizer, os.path.join(folder, "tokenizer"))
        write_pipeline_file(folder, cfg, {e: _EXPERT_DIRS["megawan"][e] for e in experts},
                            vae="vae.safetensors", vae_config=vae_cfg.name, text_encoder="text_encoder.safetensors",
                            text_config=text_cfg.name, tokenizer="tokenizer",
                            clip=None if clip_cfg is None else "image_encoder.safetensors",
                            clip_config=None if clip_cfg is None else clip_cfg.name)
        return
    # diffusers
    os.makedirs(os.path.join(folder, "vae"))
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, os.path.join(folder, "vae",
                                                                           "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "vae", "config.json"), "w", encoding="utf-8") as f:
        json.dump(diffusers_vae_config_json(vae_cfg), f, indent=2)
    os.makedirs(os.path.join(folder, "text_encoder"))
    text_sd = {k: v for k, v in text_sd.items() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    save_file({k: v.contiguous() for k, v in text_sd.items()},
              os.path.join(folder, "text_encoder", "model.safetensors"))
    with open(os.path.join(folder, "text_encoder", "config.json"), "w", encoding="utf-8") as f:
        json.dump(transformers_config_json(text_cfg), f, indent=2)
    _write_diffusers_tokenizer(tokenizer, os.path.join(folder, "tokenizer"), text_cfg)
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(diffusers_scheduler_config_json(cfg), f, indent=2)
    two = len(experts) == 2
    image = cfg.model_type == "i2v"  # Wan2.1 I2V / FLF2V (with CLIP) and Wan2.2 I2V-A14B (without)
    index = {"_class_name": "WanImageToVideoPipeline" if image else "WanPipeline", "_diffusers_version": "0.33.0",
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if two else [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"],
             "boundary_ratio": cfg.expert_boundary if two else None, "expand_timesteps": cfg.model_type == "ti2v"}
    if image:
        index["image_encoder"] = ["transformers", "CLIPVisionModel"] if clip_cfg is not None else [None, None]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"] if clip_cfg is not None else [None, None]
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def _write_diffusers_tokenizer(src: str, dst: str, text_cfg) -> None:
    """transformers' T5Tokenizer folder around the sentencepiece model (no extra ids: umT5's vocabulary has its
    sentinels inside the model)."""
    os.makedirs(dst)
    model = os.path.join(src, "spiece.model") if os.path.isdir(src) else src
    shutil.copy(model, os.path.join(dst, "spiece.model"))
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": text_cfg.text_len,
                   "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": []},
                  f, indent=2)
