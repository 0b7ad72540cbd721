"""State-dict conversion between layouts, as tables (see dit_keys.py), plus tensor-parallel split / merge.

    from megawan.convert import convert_state_dict
    sd = convert_state_dict(official_sd, src="official", dst="megawan", config=cfg)
    shards = convert_state_dict(official_sd, src="official", dst="megawan", config=cfg, tp_size=2)  # [rank0, rank1]
    sd = convert_state_dict(shards, src="megawan", dst="diffusers", config=cfg)                   # merged
    vae_sd = convert_state_dict(load_state_dict_file("Wan2.1_VAE.pth"), "official", "megawan", vae_cfg)
    clip_sd = convert_state_dict(clip_vision_model.state_dict(), "transformers", "megawan", clip_cfg)

The layouts per model: DiT official / diffusers / megawan; VAE official / diffusers / megawan; umT5 official /
transformers / megawan; CLIP official (open-clip `visual.*`) / transformers (CLIPVisionModel) / megawan.

Tensors are passed through untouched (renamed, split or concatenated only): round trips are bit-exact.
Unknown keys, missing keys and wrong shapes are errors that name the key.
"""

from __future__ import annotations

import torch

from megawan.config import CLIPConfig, DiTConfig, TextConfig, VAEConfig
from megawan.convert.clip_keys import (CLIP_LAYOUTS, CLIP_TP_AXIS, clip_key_table, clip_param_shapes, official_to_table,
                                       table_to_official, transformers_to_table)
from megawan.convert.dit_keys import LAYOUTS, TP_AXIS, dit_key_table, dit_param_shapes
from megawan.convert.files import SafetensorsDir, load_safetensors_folder, load_state_dict_file
from megawan.convert.tensor_parallel import merge_tensor_parallel, split_tensor_parallel
from megawan.convert.text_keys import TEXT_LAYOUTS, TEXT_TP_AXIS, TIED, text_key_table, text_param_shapes
from megawan.convert.vae_keys import vae_key_table, vae_param_shapes

__all__ = ["convert_state_dict", "load_state_dict_file", "load_safetensors_folder", "SafetensorsDir",
           "split_tensor_parallel", "merge_tensor_parallel", "LAYOUTS"]


def convert_state_dict(state_dict, src: str, dst: str, config, tp_size: int = 1):
    """Convert `state_dict` from layout `src` to layout `dst` for a model with `config`.

    src / dst: "official" | "diffusers" | "megawan". A list of state dicts with src="megawan" is a set of
    TP shards (rank order) and is merged first. dst="megawan" with tp_size > 1 returns the list of shards.
    """
    if isinstance(config, TextConfig):
        return _convert_text(state_dict, src, dst, config, tp_size)
    if isinstance(config, CLIPConfig):
        return _convert_clip(state_dict, src, dst, config, tp_size)
    if isinstance(config, VAEConfig):
        if tp_size > 1 or isinstance(state_dict, (list, tuple)):
            raise ValueError("the VAE is not tensor-parallel")
        return _rename(dict(state_dict), src, dst, vae_key_table(config), vae_param_shapes(config), config.name, "VAE")
    if not isinstance(config, DiTConfig):
        raise TypeError(f"no conversion table for config type {type(config).__name__}")
    for name, layout in (("src", src), ("dst", dst)):
        if layout not in LAYOUTS:
            raise ValueError(f"{name}={layout!r} is not one of {LAYOUTS}")
    if isinstance(state_dict, (list, tuple)):
        if src != "megawan":
            raise ValueError("a list of state dicts (TP shards) is only accepted with src='megawan'")
        state_dict = merge_tensor_parallel([_drop_extra_state(s) for s in state_dict], TP_AXIS)
    if tp_size > 1 and dst != "megawan":
        raise ValueError("tp_size > 1 splits into megawan TP shards: use dst='megawan'")

    state_dict = _drop_extra_state(state_dict) if src == "megawan" else dict(state_dict)
    if src == "diffusers":  # diffusers keeps an unused key in some Wan checkpoints
        state_dict = {k: v for k, v in state_dict.items() if ".norm_added_q." not in k}
    out = _rename(state_dict, src, dst, dit_key_table(config), dit_param_shapes(config), config.name, "DiT")
    if dst == "megawan" and tp_size > 1:
        return split_tensor_parallel(out, tp_size, TP_AXIS)
    return out


def _convert_text(state_dict, src: str, dst: str, config, tp_size: int):
    """umT5: layouts megawan / official / transformers; TP shards like the DiT's."""
    for name, layout in (("src", src), ("dst", dst)):
        if layout not in TEXT_LAYOUTS:
            raise ValueError(f"{name}={layout!r} is not one of {TEXT_LAYOUTS} for the umT5 encoder")
    if isinstance(state_dict, (list, tuple)):
        state_dict = merge_tensor_parallel([_drop_extra_state(s) for s in state_dict], TEXT_TP_AXIS)
    state_dict = _drop_extra_state(dict(state_dict))
    if src in TIED:
        main, tied = TIED[src]
        if tied in state_dict and main in state_dict and not torch.equal(state_dict[tied], state_dict[main]):
            raise ValueError(f"{tied} differs from {main}: they are one tied tensor")
        state_dict.pop(tied, None) if main in state_dict else state_dict.__setitem__(main, state_dict.pop(tied))
    out = _rename(state_dict, src, dst, text_key_table(config), text_param_shapes(config), config.name, "umT5 encoder",
                  layouts=TEXT_LAYOUTS)
    if dst in TIED:
        main, tied = TIED[dst]
        out[tied] = out[main]
    if dst == "megawan" and tp_size > 1:
        return split_tensor_parallel(out, tp_size, TEXT_TP_AXIS)
    return out


def _convert_clip(state_dict, src: str, dst: str, config, tp_size: int):
    """CLIP vision tower: layouts megawan / transformers / official (fused to_qkv, see clip_keys.py)."""
    for name, layout in (("src", src), ("dst", dst)):
        if layout not in CLIP_LAYOUTS:
            raise ValueError(f"{name}={layout!r} is not one of {CLIP_LAYOUTS} for the CLIP image encoder")
    if tp_size > 1 and dst != "megawan":
        raise ValueError("tp_size > 1 splits into megawan TP shards: use dst='megawan'")
    if isinstance(state_dict, (list, tuple)):
        if src != "megawan":
            raise ValueError("a list of state dicts (TP shards) is only accepted with src='megawan'")
        state_dict = merge_tensor_parallel([_drop_extra_state(s) for s in state_dict], CLIP_TP_AXIS)
    state_dict = _drop_extra_state(dict(state_dict))
    if src == "official":
        state_dict = official_to_table(state_dict)
    elif src == "transformers":
        state_dict = transformers_to_table(state_dict)
    out = _rename(state_dict, src, dst, clip_key_table(config), clip_param_shapes(config), config.name,
                  "CLIP image encoder", layouts=CLIP_LAYOUTS)
    if dst == "official":
        out = table_to_official(out)
    if dst == "megawan" and tp_size > 1:
        return split_tensor_parallel(out, tp_size, CLIP_TP_AXIS)
    return out


def _rename(state_dict: dict, src: str, dst: str, table: list, shapes: dict, name: str, what: str,
            layouts: tuple = LAYOUTS) -> dict:
    """Rename every key from layout src to dst by the table, checking keys and shapes."""
    src_i, dst_i = layouts.index(src), layouts.index(dst)
    to_megawan = {row[src_i]: row[0] for row in table}
    to_dst = {row[0]: row[dst_i] for row in table}
    unknown = [k for k in state_dict if k not in to_megawan]
    if unknown:
        raise KeyError(f"{len(unknown)} {src} key(s) do not belong to a {name} {what}, e.g. {unknown[0]!r}")
    missing = [k for k in to_megawan if k not in state_dict]
    if missing:
        raise KeyError(f"{len(missing)} {src} key(s) missing for a {name} {what}, e.g. {missing[0]!r}")
    out = {}
    for key, tensor in state_dict.items():
        ours = to_megawan[key]
        if tuple(tensor.shape) != shapes[ours]:
            raise ValueError(f"{src} key {key!r} has shape {tuple(tensor.shape)}, expected {shapes[ours]} for {name}")
        out[to_dst[ours]] = tensor
    return out


def _drop_extra_state(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
