"""LoRA files the community's tools read: safetensors in diffusers' (peft's) layout or in ComfyUI's (kohya's).

    diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight [rank, in], ...lora_B.weight [out, rank]; alpha in the
               header's `lora_adapter_metadata` (peft's LoraConfig as diffusers' save_lora_weights writes it), so
               `WanPipeline.load_lora_weights` scales by alpha / rank and the tensors stay the trained ones
    comfyui    diffusion_model.blocks.0.self_attn.q.lora_down.weight, ...lora_up.weight, ...alpha (a scalar
               tensor): official Wan names, as ComfyUI, kohya / musubi-tuner and diffusers' converter
               (_convert_non_diffusers_wan_lora_to_diffusers) take them

Reading takes either, also peft's layout without `transformer.` (or with `base_model.model.`), lora_A / lora_B
under `diffusion_model.`, and per-linear `.alpha` tensors in any layout; no alpha at all means alpha = rank (scale
1, the diffusers / peft convention). A file reads as {megawan global linear name: LoRATensors(A, B, alpha)}, the
whole (unsplit) tensors as stored.

    lora = read_lora_file("style.safetensors")        # {"blocks.0.self_attention.linear_q": (A, B, alpha), ...}
    write_lora_file({name: (A, B)}, 16.0, "out.safetensors", format="comfyui")
    load_lora(model, "style.safetensors", scale=0.8)  # adapters with the file's rank / alpha, or fill existing ones
    export_lora(model, "mine.safetensors")             # a whole model's adapters (TP-split ones gathered)
    merge_lora_file(state_dict, "style.safetensors", 0.8)   # W += 0.8 alpha / rank B A on whole megawan weights
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megawan.lora.adapters import LoRAAdapter, attach
from megawan.lora.apply import _blocks, _owner, adapters, has_lora
from megawan.lora.targets import LINEARS
from megawan.utils.user_errors import UserError

FORMATS = ("diffusers", "comfyui")
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")
_KINDS = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B", "alpha": "alpha"}
_TO_MEGAWAN = {name: row[0] for row in LINEARS for name in row}  # any of a linear's three names -> megawan's
_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$")


class LoRAFileError(UserError, ValueError):
    """A LoRA file (or its tensors) that does not fit: the message names the file, the key and the sizes."""


class LoRATensors(NamedTuple):
    A: torch.Tensor  # [rank, in] (peft's lora_A, kohya's lora_down)
    B: torch.Tensor  # [out, rank] (lora_B, lora_up)
    alpha: float  # the update is alpha / rank · B A


class LoRAFile(dict):
    """{megawan global linear name: LoRATensors}, remembering where it came from (`path`) and each linear's key
    in the file (`file_keys[name]`), so that errors name what the user can find in the file."""

    def __init__(self, path: str = "", tensors: Optional[dict] = None, file_keys: Optional[dict] = None):
        super().__init__(tensors or {})
        self.path = path
        self.file_keys = file_keys or {}

    def key_of(self, name: str) -> str:
        return self.file_keys.get(name, name + ".lora_A")


def _split_name(name: str) -> tuple:
    """(block index, megawan name within the block) of a global linear name `blocks.N.<linear>`."""
    _, index, rest = name.split(".", 2)
    return int(index), rest


def _names(name: str) -> tuple:
    index, rest = _split_name(name)
    for row in LINEARS:
        if row[0] == rest:
            return index, row
    raise LoRAFileError(f"{name} is not a linear of a Wan block")


def _ordered(names) -> list:
    """Global linear names in model order: by block, then as a block holds its linears."""
    order = {row[0]: i for i, row in enumerate(LINEARS)}
    return sorted(names, key=lambda n: (_split_name(n)[0], order.get(_split_name(n)[1], len(order))))


def lora_argument(text: str, flag: str = "--lora") -> tuple:
    """FILE[:SCALE] -> (FILE, SCALE); a file name with a colon but no number after it stays whole."""
    path, _, scale = text.rpartition(":")
    if path and scale:
        try:
            return path, float(scale)
        except ValueError:
            pass
    if not text.endswith(".safetensors"):
        raise LoRAFileError(f"{flag} {text}: give FILE.safetensors or FILE.safetensors:SCALE")
    return text, 1.0


# ----------------------------------------------------------------------------------------------
# Writing


def _metadata(names: list, ranks: dict, alphas: dict) -> dict:
    """peft's LoraConfig fields as diffusers writes them (`transformer.`-prefixed); per-linear rank / alpha
    patterns only where a linear differs from the most common value."""
    targets = {name: f"blocks.{_names(name)[0]}.{_names(name)[1][2]}" for name in names}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    meta = {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets.values()), "bias": "none"}
    rank_pattern = {"^" + re.escape(targets[n]): ranks[n] for n in names if ranks[n] != r}
    alpha_pattern = {"^" + re.escape(targets[n]): alphas[n] for n in names if alphas[n] != alpha}
    if rank_pattern:
        meta["rank_pattern"] = rank_pattern
    if alpha_pattern:
        meta["alpha_pattern"] = alpha_pattern
    return {"transformer." + k: v for k, v in meta.items()}


def write_lora_file(tensors: dict, alphas, path: str, format: str = "diffusers") -> str:
    """Write {megawan global linear name: (A, B)} (or (A, B, alpha) with alphas=None) as a LoRA safetensors file
    in `format` (diffusers | comfyui). alphas: one number for every linear, or {name: alpha}. Returns `path`."""
    if format not in FORMATS:
        raise LoRAFileError(f"LoRA format {format!r} is not one of {FORMATS}")
    if not tensors:
        raise LoRAFileError(f"{path}: no LoRA tensors to write")
    out, ranks, alpha_of = {}, {}, {}
    for name, value in tensors.items():
        a, b = value[0], value[1]
        alpha = value[2] if alphas is None else (alphas[name] if isinstance(alphas, dict) else alphas)
        index, (_, official, diffusers) = _names(name)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRAFileError(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a LoRA pair "
                                "(A [rank, in], B [out, rank])")
        ranks[name], alpha_of[name] = int(a.shape[0]), float(alpha)
        if format == "diffusers":
            stem = f"transformer.blocks.{index}.{diffusers}"
            out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = a, b
        else:
            stem = f"diffusion_model.blocks.{index}.{official}"
            out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = a, b
            out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    header = {"format": "pt"}
    if format == "diffusers":
        header[METADATA_KEY] = json.dumps(_metadata(list(tensors), ranks, alpha_of), indent=2, sort_keys=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in out.items()}, path, metadata=header)
    return path


# ----------------------------------------------------------------------------------------------
# Reading


def _metadata_alpha(meta: Optional[dict], target: str) -> Optional[float]:
    """The alpha peft's LoraConfig (diffusers' header) gives the module `target` (blocks.N.<diffusers name>)."""
    if not meta:
        return None
    meta = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in meta.items()}
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", target):  # peft's get_pattern_key
            return float(value)
    return float(meta["lora_alpha"]) if meta.get("lora_alpha") is not None else None


def read_lora_file(path: str) -> LoRAFile:
    """The LoRA of a safetensors file in either layout: {megawan global linear name: LoRATensors(A, B, alpha)}
    (tensors as stored, whole). A key that is not a LoRA tensor of a Wan block linear is refused, naming it."""
    if not str(path).endswith(".safetensors"):
        raise LoRAFileError(f"{path}: a LoRA file is a .safetensors file")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        parts, file_keys = {}, {}
        for key in f.keys():
            bare = key
            for prefix in _PREFIXES:
                bare = bare[len(prefix):] if bare.startswith(prefix) else bare
            m = _KEY.match(bare)
            if m is None or m.group(2) not in _TO_MEGAWAN:
                raise LoRAFileError(f"{path}: key {key!r} matches no linear of a Wan block (a LoRA of the "
                                    "blocks' attention / FFN linears is expected; DoRA, bias and norm diffs are not "
                                    "read)")
            name = f"blocks.{int(m.group(1))}.{_TO_MEGAWAN[m.group(2)]}"
            kind = _KINDS[m.group(3)]
            parts.setdefault(name, {})[kind] = f.get_tensor(key)
            file_keys.setdefault(name, {})[kind] = key
    try:
        meta = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    except json.JSONDecodeError:
        raise LoRAFileError(f"{path}: its {METADATA_KEY} header is not JSON") from None
    if not parts:
        raise LoRAFileError(f"{path} holds no LoRA tensors")
    out = LoRAFile(str(path))
    for name in _ordered(parts):
        got, keys = parts[name], file_keys[name]
        for kind in ("A", "B"):
            if kind not in got:
                partner = "lora_A / lora_down" if kind == "A" else "lora_B / lora_up"
                raise LoRAFileError(f"{path}: {next(iter(keys.values()))!r} has no {partner} partner")
        a, b = got["A"], got["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRAFileError(f"{path}: {keys['A']!r} {tuple(a.shape)} and {keys['B']!r} {tuple(b.shape)} are "
                                "not a LoRA pair (A [rank, in], B [out, rank])")
        rank = a.shape[0]
        if "alpha" in got:
            alpha = float(got["alpha"].float().item())
        else:
            index, row = _names(name)
            alpha = _metadata_alpha(meta, f"blocks.{index}.{row[2]}")
            alpha = float(rank) if alpha is None else alpha
        out[name] = LoRATensors(a, b, alpha)
        out.file_keys[name] = keys["A"]
    return out


def lora_from_checkpoint(source, lora_section: dict, origin: str = "") -> LoRAFile:
    """The adapters of a LoRA training checkpoint as a LoRAFile. source: keys() / get(key) of its whole model
    tensors (megawan.checkpoint.CheckpointTensors); lora_section: its run config's `lora:` (alpha; None = rank).
    Keys other than adapters' (a checkpoint that also holds its base) are passed over."""
    parts = {}
    for key in source.keys():
        m = re.match(r"(?:.*\.)?(blocks\.\d+\..+)_lora\.lora_(A|B)$", key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = key
    if not parts:
        raise LoRAFileError(f"{origin or 'the checkpoint'} holds no LoRA adapter tensors (is it a LoRA run's?)")
    alpha = (lora_section or {}).get("alpha")
    out = LoRAFile(origin)
    for name in _ordered(parts):
        keys = parts[name]
        a, b = source.get(keys["A"]), source.get(keys["B"])
        out[name] = LoRATensors(a, b, float(a.shape[0] if alpha is None else alpha))
        out.file_keys[name] = keys["A"]
    return out


def _as_lora(lora) -> LoRAFile:
    return lora if isinstance(lora, LoRAFile) else read_lora_file(lora)


# ----------------------------------------------------------------------------------------------
# Sizes and merging into whole weights


def _check_size(lora: LoRAFile, name: str, shape: tuple, what: str) -> None:
    t, key = lora[name], lora.key_of(name)
    out_f, in_f = tuple(shape)
    if t.A.shape[1] != in_f:
        raise LoRAFileError(f"{lora.path}: key {key!r} takes {t.A.shape[1]} in-features, but {name} of {what} "
                            f"takes {in_f} (a LoRA for another model size?)")
    if t.B.shape[0] != out_f:
        raise LoRAFileError(f"{lora.path}: the lora_B of {key!r} gives {t.B.shape[0]} out-features, but {name} of "
                            f"{what} gives {out_f} (a LoRA for another model size?)")


def check_shapes(lora, shapes: dict, what: str = "the model") -> None:
    """Refuse a LoRA that does not fit whole megawan weights of these shapes ({key: shape}), naming the file's
    key and both sizes (a LoRA for another model size, or a linear the model lacks)."""
    lora = _as_lora(lora)
    for name in lora:
        shape = shapes.get(name + ".weight")
        if shape is None:
            raise LoRAFileError(f"{lora.path}: key {lora.key_of(name)!r} matches no module of {what} (it has no "
                                f"{name})")
        _check_size(lora, name, shape, what)


def lora_delta(t: LoRATensors, scale: float = 1.0) -> torch.Tensor:
    """scale · alpha / rank · B A in fp32 (what merging adds to the whole weight)."""
    return (t.B.float() @ t.A.float()) * (scale * t.alpha / t.A.shape[0])


def merge_lora_file(state_dict: dict, lora, scale: float = 1.0) -> dict:
    """W += scale · alpha / rank · B A for every linear of `lora` (a file's path or a LoRAFile) in a whole
    (unsplit) megawan state dict, in fp32 and cast back to W's dtype. In place; returns the state dict."""
    lora = _as_lora(lora)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    check_shapes(lora, shapes, "the base weights")
    for name, t in lora.items():
        w = state_dict[name + ".weight"]
        state_dict[name + ".weight"] = (w.float() + lora_delta(t, scale).to(w.device)).to(w.dtype)
    return state_dict


class MergedSource:
    """A tensor source (keys() / get(key), e.g. conversion's) whose adapted weights come back with LoRAs merged.
    to_megawan: {source key: megawan key}; loras: [(LoRAFile, scale)], checked against the source's shapes."""

    def __init__(self, source, to_megawan: dict, shapes: dict, loras: list):
        self.source, self.loras = source, list(loras)
        self.from_megawan = {v: k for k, v in to_megawan.items()}
        for lora, _ in self.loras:
            check_shapes(lora, shapes, "the source model")
        self.deltas = {}
        for lora, scale in self.loras:
            for name in lora:
                self.deltas.setdefault(self.from_megawan[name + ".weight"], []).append((lora[name], scale))

    def keys(self):
        return self.source.keys()

    def get(self, key: str) -> torch.Tensor:
        w = self.source.get(key)
        if key not in self.deltas:
            return w
        merged = w.float()
        for t, scale in self.deltas[key]:
            merged += lora_delta(t, scale)
        return merged.to(w.dtype)


# ----------------------------------------------------------------------------------------------
# Models


def _check_fits(lora: LoRAFile, name: str, adapter: LoRAAdapter) -> None:
    t, key = lora[name], lora.key_of(name)
    if t.A.shape[0] != adapter.rank:
        raise LoRAFileError(f"{lora.path}: key {key!r} has rank {t.A.shape[0]}, but the model's adapter on {name} has "
                            f"rank {adapter.rank}")
    _check_size(lora, name, (adapter.out_features, adapter.in_features), "the model")


@torch.no_grad()
def load_lora(model, lora, scale: float = 1.0) -> list:
    """Give `model` (a WanDiT, one TP rank's part of one, or a pipeline chunk: blocks elsewhere are passed over)
    the adapters of `lora` (a file's path or a LoRAFile) with its rank / alpha / targets, filled with its tensors
    (this TP rank's slices) and multiplied by `scale`. A model with adapters already (apply_lora) has those filled
    instead: the file must cover exactly them, at their rank. Returns the global names of the adapted linears."""
    lora = _as_lora(lora)
    total = model.dit_config.num_layers
    blocks = dict(_blocks(model))
    existing = dict(adapters(model))
    plan = []
    for name, t in lora.items():
        key = lora.key_of(name)
        index, relative = _split_name(name)
        if index >= total:
            raise LoRAFileError(f"{lora.path}: key {key!r} matches no module: the model has {total} blocks")
        if index not in blocks:
            continue  # another pipeline stage's block
        parent, attr = _owner(blocks[index], relative)
        if not hasattr(parent, attr):
            raise LoRAFileError(f"{lora.path}: key {key!r} matches no module of {model.dit_config.name} "
                                f"(it has no {relative})")
        adapter = existing.get(name)
        if existing and adapter is None:
            raise LoRAFileError(f"{lora.path}: key {key!r} is for {name}, which has no adapter in the model")
        if adapter is None:
            adapter = LoRAAdapter(getattr(parent, attr), t.A.shape[0], t.alpha, scale=scale)
        _check_fits(lora, name, adapter)
        plan.append((name, parent, attr, adapter))
    if existing:
        missing = sorted(set(existing) - {p[0] for p in plan})
        if missing:
            raise LoRAFileError(f"{lora.path} holds no tensors for the model's adapter on {missing[0]}")
    for name, parent, attr, adapter in plan:
        a, b = adapter.this_rank(lora[name].A, lora[name].B)
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
        adapter.alpha, adapter.multiplier = lora[name].alpha, float(scale)
        if name not in existing:
            attach(parent, attr, adapter)
    return [p[0] for p in plan]


def _whole(adapter: LoRAAdapter) -> tuple:
    """(A, B) of an adapter, gathered over its TP group where split (collective over that group)."""
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    group = adapter.tp_group
    if group is None or adapter.mode not in ("row", "column"):
        return a, b
    split = a if adapter.mode == "row" else b
    parts = [torch.empty_like(split) for _ in range(group.size())]
    dist.all_gather(parts, split.contiguous(), group=group)
    whole = torch.cat(parts, dim=1 if adapter.mode == "row" else 0)
    return (whole, b) if adapter.mode == "row" else (a, whole)


@torch.no_grad()
def export_lora(model, path: str, format: str = "diffusers") -> Optional[str]:
    """Write the adapters of a whole model (PP = 1) to a LoRA file in `format` (diffusers | comfyui). Adapters
    split over a TP group are gathered first: then call it on every TP rank of one model replica, and the first
    TP rank writes. Returns the path where written, else None."""
    if not has_lora(model):
        raise LoRAFileError(f"export_lora: the model has no LoRA adapters to write to {path}")
    if len(model.layers) != model.dit_config.num_layers:
        raise LoRAFileError("export_lora needs the whole model (pipeline parallel 1); a checkpoint of any layout "
                            "exports with tools/convert_checkpoint.py --lora-out")
    tensors, alphas, first = {}, {}, True
    for name, adapter in adapters(model):
        tensors[name] = _whole(adapter)
        alphas[name] = adapter.alpha
        if adapter.tp_group is not None:
            first = first and adapter.tp_group.rank() == 0
    return write_lora_file(tensors, alphas, path, format) if first else None
