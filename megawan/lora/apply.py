"""Adding LoRA adapters to a built WanDiT (or each pipeline chunk of one), freezing the rest, merging them back.

    params = apply_lora(model, rank=16, alpha=16)          # every block linear; the base is frozen
    params = apply_lora(model, rank=8, alpha=8, targets=["q", "k", "v", "o"])
    for name, adapter in adapters(model): ...             # global names: blocks.3.self_attention.linear_q
    merge_adapters(model)                                  # W += scale B A on every rank's shard; adapters removed

The model may be a TP=1 model built without any process group, or one rank's chunk under any TP / PP / CP / SP
layout: the adapters take their split from the linears they adapt (megawan.lora.adapters).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from megawan.lora.adapters import SUFFIX, LoRAAdapter, adapter_seed, attach, detach
from megawan.lora.targets import select_linears


def _owner(block: nn.Module, dotted: str) -> tuple:
    parent_name, _, attr = dotted.rpartition(".")
    return block.get_submodule(parent_name) if parent_name else block, attr


def _blocks(model) -> Iterator[tuple]:
    """(global block index, block) of a WanDiT or one of its pipeline chunks."""
    layers = getattr(model, "layers", range(len(model.blocks)))
    yield from zip(layers, model.blocks)


def apply_lora(model, rank: int, alpha: Optional[float] = None, targets: Optional[Iterable[str]] = None,
               dropout: float = 0.0, init: str = "gaussian", seed: Optional[int] = None,
               freeze_base: bool = True, scale: float = 1.0) -> list:
    """Add an adapter to each selected block linear of `model` and return the adapter parameters (every other
    parameter is frozen unless freeze_base=False). alpha: default `rank` (scale 1). seed: the adapters' init
    seed; default the model's own init seed, so every chunk of one model (and every TP rank) agrees."""
    if getattr(model, "image_embedding", None) is None:
        image_branch = False
    else:
        image_branch = getattr(model.dit_config, "image_dim", None) is not None
    chosen = select_linears(None if targets is None else list(targets), image_branch=image_branch)
    alpha = float(rank if alpha is None else alpha)
    seed = getattr(model, "init_seed", 0) if seed is None else seed
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    params = []
    for index, block in _blocks(model):
        for dotted in chosen:
            parent, attr = _owner(block, dotted)
            if not hasattr(parent, attr):
                continue
            linear = getattr(parent, attr)
            adapter = LoRAAdapter(linear, rank, alpha, dropout, init, adapter_seed(seed, f"blocks.{index}.{dotted}"),
                                  scale=scale)
            attach(parent, attr, adapter)
            params += [adapter.lora_A, adapter.lora_B]
    if not params:
        raise ValueError("apply_lora: the model has no block linears to adapt")
    return params


def adapters(model) -> Iterator[tuple]:
    """(global name of the adapted linear, its adapter) for every adapter of `model`, in block order."""
    for index, block in _blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, LoRAAdapter) and name.endswith(SUFFIX):
                yield f"blocks.{index}.{name[:-len(SUFFIX)]}", module


def lora_parameters(model) -> list:
    return [p for _, a in adapters(model) for p in (a.lora_A, a.lora_B)]


def has_lora(model) -> bool:
    return next(adapters(model), None) is not None


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter / state-dict key of the model is an adapter's."""
    return f"{SUFFIX}.lora_" in name


def base_state_dict(model) -> dict:
    """The model's state dict without its adapters (what a base checkpoint or conversion holds)."""
    return {k: v for k, v in model.state_dict().items() if not is_lora_parameter(k)}


@torch.no_grad()
def merge_adapters(model) -> int:
    """Fold every adapter into its linear's weight (W += scale B A, on each rank's shard, in fp32 then cast) and
    remove the adapters. Returns how many were merged."""
    merged = 0
    for index, block in _blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, LoRAAdapter) and name.endswith(SUFFIX):
                parent, attr = _owner(block, name[:-len(SUFFIX)])
                linear = getattr(parent, attr)
                linear.weight.copy_((linear.weight.float() + module.delta_weight()).to(linear.weight.dtype))
                detach(parent, attr)
                merged += 1
    return merged
