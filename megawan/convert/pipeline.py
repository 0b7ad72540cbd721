"""Whole pipelines between the three layouts: the DiT (both A14B experts), the Wan-VAE, the umT5 encoder,
the tokenizer and the configs. `tools/convert_checkpoint.py` is the command line.

    official   as Wan-Video ships it: config.json + diffusion_pytorch_model*.safetensors (+ .index.json), or
               high_noise_model/ + low_noise_model/ for A14B; Wan2.x_VAE.pth; models_t5_umt5-*-enc*.pth;
               google/umt5-xxl/ (the tokenizer)
    diffusers  what `diffusers.WanPipeline.from_pretrained` loads: model_index.json, transformer/ (+ transformer_2/),
               vae/, text_encoder/, tokenizer/, scheduler/
    megawan    megawan_pipeline.json; transformer/ (or high_noise_model/ + low_noise_model/): megatron-core
               dist_checkpointing directories written at the requested TP x PP (loadable at any layout, and by
               `megawan train --init-from`); vae.safetensors, text_encoder.safetensors (megawan names); tokenizer/

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
import warnings
from typing import Iterator, Optional

import torch

from megawan.config import DiTConfig, dit_config_from, dit_preset
from megawan.convert.dit_keys import TP_AXIS, dit_key_table, dit_param_shapes
from megawan.convert.files import load_state_dict_file

FORMATS = ("official", "diffusers", "megawan")
PIPELINE_FILE = "megawan_pipeline.json"
SHARD_BYTES = 5 * 1024 ** 3  # official / diffusers shard size (bytes), as the Hub files are cut
_EXPERT_DIRS = {  # expert -> folder, per format
    "official": {"high_noise": "high_noise_model", "low_noise": "low_noise_model", "transformer": ""},
    "diffusers": {"high_noise": "transformer", "low_noise": "transformer_2", "transformer": "transformer"},
    "megawan": {"high_noise": "high_noise_model", "low_noise": "low_noise_model", "transformer": "transformer"},
}


# ----------------------------------------------------------------------------------------------
# Reading DiT tensors lazily


class SafetensorsDir:
    """The tensors of a folder of (sharded) safetensors files, read one at a time."""

    def __init__(self, folder: str, stem: str = "diffusion_pytorch_model"):
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and f.startswith(stem))
        if not files:
            raise FileNotFoundError(f"{folder} holds no {stem}*.safetensors")
        self._where, self._handles = {}, []
        for name in files:
            handle = safe_open(os.path.join(folder, name), framework="pt")
            self._handles.append(handle)
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"{key!r} appears in two shards of {folder}")
                self._where[key] = handle

    def keys(self) -> list:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


class DistCheckpointDir:
    """The model tensors of a megatron-core dist_checkpointing directory, each loaded whole on its own
    (any TP / PP layout it was saved at), without a process group. `prefix="ema."` reads the EMA weights."""

    def __init__(self, folder: str, prefix: str = ""):
        from torch.distributed.checkpoint import FileSystemReader

        self.folder, self.prefix = folder, prefix
        meta = FileSystemReader(folder).read_metadata().state_dict_metadata
        self._meta = {k[len(prefix):]: m for k, m in meta.items()
                      if k.startswith(prefix) and hasattr(m, "size") and not k.startswith("optimizer")
                      and (prefix or not k.startswith("ema."))}
        if not self._meta:
            raise ValueError(f"{folder} holds no {'EMA ' if prefix else ''}model tensors")

    def keys(self) -> list:
        return list(self._meta)

    def get(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        m = self._meta[key]
        out = {self.prefix + key: torch.empty(tuple(m.size), dtype=m.properties.dtype)}
        with warnings.catch_warnings():  # torch's notice about no_dist, not ours to act on
            warnings.simplefilter("ignore")
            dcp.load(out, checkpoint_id=self.folder, no_dist=True)
        return out[self.prefix + key]


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
    from safetensors.torch import save_file

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


def official_config_json(cfg: DiTConfig) -> dict:
    model_type = "flf2v" if cfg.image_pos_len else cfg.model_type
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": model_type,
            "patch_size": list(cfg.patch_size), "text_len": cfg.text_len, "in_dim": cfg.in_dim, "dim": cfg.dim,
            "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.out_dim,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "window_size": [-1, -1],
            "qk_norm": cfg.qk_norm, "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps}


def diffusers_config_json(cfg: DiTConfig) -> dict:
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
            "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
            "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
            "eps": cfg.eps, "image_dim": cfg.image_dim, "added_kv_proj_dim": cfg.dim if cfg.image_dim else None,
            "rope_max_seq_len": cfg.rope_max_len, "pos_embed_seq_len": cfg.image_pos_len}


def _megawan_run_config(cfg: DiTConfig) -> dict:
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return {"model": model}


def _write_megawan_rank(rank: int, src_path: str, src_format: str, src_prefix: str, cfg: DiTConfig,
                        dst: str, tp: int, pp: int) -> None:
    """One rank of a TP x PP world: build its model chunk, fill it from the source (only its own tensors,
    its TP slice of each), save the whole model with dist_checkpointing (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megawan.checkpointing import _save_strategy
    from megawan.config import ParallelConfig
    from megawan.convert.tensor_parallel import split_tensor_parallel
    from megawan.models.dit.parallelize import build_model_chunks, chunk_state_dict
    from megawan.training.checkpoint import model_sharded_state_dict

    source = _dit_source(src_path, src_format, src_prefix)
    first = next(iter(source.keys()))
    dtype = source.get(first).dtype
    model_cfg = dataclasses.replace(cfg, params_dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                                                       torch.float32: "float32"}[dtype])
    chunks = build_model_chunks(model_cfg, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
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
    dist_checkpointing.save({"model": model_sharded_state_dict(chunks)}, dst, sharded_strategy=_save_strategy())


def _dit_source(path: str, fmt: str, prefix: str = ""):
    if fmt == "megawan":
        return DistCheckpointDir(path, prefix)
    return SafetensorsDir(path)


# ----------------------------------------------------------------------------------------------
# Pipelines


def read_pipeline(src: str, fmt: str, model: Optional[str] = None, encoders: Optional[str] = None,
                  ema: bool = False, boundary: Optional[float] = None) -> dict:
    """What a source pipeline holds: {"config", "experts": {name: (path, reader-prefix)}, "vae", "text_encoder",
    "tokenizer", "vae_state", "text_state", "boundary"}; encoder states in megawan names."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    out = {"experts": {}}
    if fmt == "official":
        experts = {e: os.path.join(src, d) for e, d in _EXPERT_DIRS["official"].items()
                   if e != "transformer" and os.path.isdir(os.path.join(src, d))} or {"transformer": src}
        with open(os.path.join(next(iter(experts.values())), "config.json"), encoding="utf-8") as f:
            config_json = json.load(f)
        keys = SafetensorsDir(next(iter(experts.values()))).keys()
        cfg = dit_config_from(config_json, state_dict_keys=keys)
        out["experts"] = {e: (p, "") for e, p in experts.items()}
        enc_folder = encoders or src
    elif fmt == "diffusers":
        with open(os.path.join(src, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        with open(os.path.join(src, "transformer", "config.json"), encoding="utf-8") as f:
            cfg = dit_config_from(json.load(f))
        two = os.path.isdir(os.path.join(src, "transformer_2")) and (index.get("transformer_2") or [None])[0]
        out["experts"] = ({"high_noise": (os.path.join(src, "transformer"), ""),
                           "low_noise": (os.path.join(src, "transformer_2"), "")} if two
                          else {"transformer": (os.path.join(src, "transformer"), "")})
        if two and index.get("boundary_ratio") is not None:
            cfg = dataclasses.replace(cfg, expert_boundary=float(index["boundary_ratio"]))
        enc_folder = None
    else:  # megawan pipeline, or a training checkpoint (+ --encoders)
        from megawan.generation import resolve_model

        found = resolve_model(src)
        cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in found["config"].items()})
        out["experts"] = {e: (p, "ema." if ema else "") for e, p in found["experts"].items()}
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
    from megawan.config import text_preset, vae_preset
    from megawan.generation import find_encoders
    from megawan.models.loading import TEXT_LAYOUTS, VAE_LAYOUTS, to_megawan

    enc = find_encoders(folder)
    vae_state, _ = to_megawan(load_state_dict_file(enc["vae"]), vae_preset(enc["vae_config"]), VAE_LAYOUTS, "Wan-VAE")
    text_state, _ = to_megawan(load_state_dict_file(enc["text_encoder"]), text_preset(enc["text_config"]),
                               TEXT_LAYOUTS, "umT5 encoder")
    return {"vae_config": enc["vae_config"], "text_config": enc["text_config"], "vae_state": vae_state,
            "text_state": text_state, "tokenizer": enc["tokenizer"]}


def _read_diffusers_encoders(src: str) -> dict:
    from megawan.config import text_preset, vae_preset
    from megawan.convert import convert_state_dict
    from megawan.generation import detect_text_preset, detect_vae_preset

    vae_sd = _load_folder_state(os.path.join(src, "vae"))
    vae_name = detect_vae_preset(vae_sd, os.path.join(src, "vae"))
    text_sd = _load_folder_state(os.path.join(src, "text_encoder"))
    text_name = detect_text_preset(text_sd, os.path.join(src, "text_encoder"))
    return {"vae_config": vae_name, "text_config": text_name,
            "vae_state": convert_state_dict(vae_sd, "megawan", "megawan", vae_preset(vae_name)),
            "text_state": convert_state_dict(text_sd, "transformers", "megawan", text_preset(text_name)),
            "tokenizer": os.path.join(src, "tokenizer")}


def _load_folder_state(folder: str) -> dict:
    from safetensors import safe_open

    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def convert_pipeline(src: str, src_format: str, dst: str, dst_format: str, model: Optional[str] = None,
                     tp: int = 1, pp: int = 1, encoders: Optional[str] = None, ema: bool = False,
                     max_shard_bytes: int = SHARD_BYTES, boundary: Optional[float] = None) -> dict:
    """Convert the pipeline at `src` into `dst` (a new folder). Returns a summary of what was written."""
    from megawan.config import text_preset, vae_preset
    from megawan.convert import convert_state_dict

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
    for expert, (path, prefix) in experts.items():
        sub = _EXPERT_DIRS[dst_format][expert]
        folder = os.path.join(tmp, sub) if sub else tmp
        if dst_format == "megawan":
            _write_megawan(path, src_format, prefix, cfg, folder, tp, pp)
        else:
            source = _dit_source(path, src_format, prefix)
            write_safetensors_shards(stream_dit(source, cfg, src_format, dst_format), folder,
                                             max_shard_bytes=max_shard_bytes)
            config_json = official_config_json(cfg) if dst_format == "official" else diffusers_config_json(cfg)
            with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config_json, f, indent=2)
    vae_cfg, text_cfg = vae_preset(pipe["vae_config"]), text_preset(pipe["text_config"])
    vae_out = convert_state_dict(pipe["vae_state"], "megawan", "megawan" if dst_format != "official" else "official",
                                 vae_cfg)
    text_layout = {"official": "official", "diffusers": "transformers", "megawan": "megawan"}[dst_format]
    text_out = convert_state_dict(pipe["text_state"], "megawan", text_layout, text_cfg)
    _write_encoders(tmp, dst_format, cfg, vae_cfg, vae_out, text_cfg, text_out, pipe["tokenizer"], experts)
    for name in os.listdir(tmp):  # complete: move into place
        os.replace(os.path.join(tmp, name), os.path.join(dst, name))
    os.rmdir(tmp)
    return {"config": cfg.name, "experts": sorted(experts), "dst": dst, "format": dst_format, "tp": tp, "pp": pp}


def _write_megawan(path: str, src_format: str, prefix: str, cfg: DiTConfig, folder: str, tp: int, pp: int) -> None:
    import yaml

    from megawan.parallel.launch import spawn_local
    from megawan.training.checkpoint import STATE_FILE

    os.makedirs(folder, exist_ok=True)
    spawn_local(_write_megawan_rank, world_size=tp * pp, tensor_parallel=tp, pipeline_parallel=pp,
                args=(path, src_format, prefix, cfg, folder, tp, pp))
    with open(os.path.join(folder, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(_megawan_run_config(cfg), f, sort_keys=False)
    with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({"step": 0, "converted_from": src_format, "layout": {"tensor_parallel": tp,
                                                                      "pipeline_parallel": pp}}, f, indent=1)


def _write_encoders(folder, fmt, cfg, vae_cfg, vae_sd, text_cfg, text_sd, tokenizer, experts) -> None:
    from safetensors.torch import save_file

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
        meta = {"format": "megawan-pipeline", "version": 1,
                "model": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
                "transformer": {e: _EXPERT_DIRS["megawan"][e] for e in experts},
                "vae": "vae.safetensors", "vae_config": vae_cfg.name, "text_encoder": "text_encoder.safetensors",
                "text_config": text_cfg.name, "tokenizer": "tokenizer"}
        with open(os.path.join(folder, PIPELINE_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        return
    # diffusers
    os.makedirs(os.path.join(folder, "vae"))
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, os.path.join(folder, "vae",
                                                                           "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "vae", "config.json"), "w", encoding="utf-8") as f:
        json.dump(_diffusers_vae_config(vae_cfg), f, indent=2)
    os.makedirs(os.path.join(folder, "text_encoder"))
    text_sd = {k: v for k, v in text_sd.items() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    save_file({k: v.contiguous() for k, v in text_sd.items()}, os.path.join(folder, "text_encoder", "model.safetensors"))
    with open(os.path.join(folder, "text_encoder", "config.json"), "w", encoding="utf-8") as f:
        json.dump(_transformers_umt5_config(text_cfg), f, indent=2)
    _write_diffusers_tokenizer(tokenizer, os.path.join(folder, "tokenizer"), text_cfg)
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(_diffusers_scheduler_config(cfg), f, indent=2)
    two = len(experts) == 2
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.33.0",
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if two else [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"],
             "boundary_ratio": cfg.expert_boundary if two else None, "expand_timesteps": cfg.model_type == "ti2v"}
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def _diffusers_vae_config(c) -> dict:
    return {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0", "base_dim": c.base_dim,
            "decoder_base_dim": c.decoder_base_dim, "z_dim": c.z_dim, "dim_mult": list(c.dim_mult),
            "num_res_blocks": c.num_res_blocks, "attn_scales": list(c.attn_scales),
            "temperal_downsample": list(c.temperal_downsample), "dropout": 0.0, "is_residual": c.is_residual,
            "in_channels": c.in_channels, "out_channels": c.out_channels, "patch_size": c.patch_size,
            "scale_factor_spatial": c.spatial_stride, "scale_factor_temporal": c.temporal_stride,
            "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std)}


def _transformers_umt5_config(c) -> dict:
    return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": c.vocab_size,
            "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_heads": c.num_heads, "num_layers": c.num_layers,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "layer_norm_epsilon": c.layer_norm_epsilon, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
            "is_gated_act": True, "tie_word_embeddings": False, "dropout_rate": 0.0, "pad_token_id": 0,
            "eos_token_id": 1, "decoder_start_token_id": 0, "torch_dtype": "float32"}


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


def _diffusers_scheduler_config(cfg: DiTConfig) -> dict:
    from megawan.generation import official_defaults

    d = official_defaults(cfg.name, cfg.model_type, cfg.expert_boundary)
    return {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0", "num_train_timesteps": 1000,
            "solver_order": 2, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "flow_shift": d["shift"], "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
            "final_sigmas_type": "zero", "thresholding": False, "timestep_spacing": "linspace"}
