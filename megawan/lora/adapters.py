"""LoRA adapters on the DiT's tensor-parallel linears (Hu et al. 2021; peft's LoraLayer arithmetic).

    y = W x + b + scale · B A dropout(x),   scale = alpha / rank,   A [rank, in] Gaussian (std 1/rank), B [out, rank] 0

Each adapter sits beside the linear it adapts (`self_attention.linear_q` gets `self_attention.linear_q_lora`,
holding `lora_A` and `lora_B` as peft names them) and adds its product to the linear's output through a forward
hook, so the base linear's class, names, checkpoint keys, recompute and FP8 product are untouched.

Tensor parallelism, chosen so that TP = N computes what TP = 1 does:
- column-parallel linear (W split on its output): A is whole on every rank, B split like W's rows. The rank's
  input is gathered (sequence parallel) as the linear gathers it; A x is the same on every rank and its gradient
  is summed over the TP group (copy_to_tensor_model_parallel_region), so A gets the whole gradient everywhere.
- row-parallel linear (W split on its input): A split like W's columns, B whole. A x is a partial sum, reduced
  over the TP group (scattered along the sequence under sequence parallelism, as the linear's output is) before
  B; under sequence parallelism B sees only its rank's tokens and is marked `sequence_parallel`, so megatron sums
  its gradient over the TP group.
Split tensors carry megatron's tensor-parallel attributes (gradient norm, checkpoint resharding); every adapter is
initialised whole from its own seed (the model's init seed and its global name) and then cut, so any TP / PP
layout starts from the same adapters.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

INITS = ("gaussian", "kaiming")  # peft's init_lora_weights="gaussian" | True (its default)
SUFFIX = "_lora"  # the adapter of `linear_q` is the sibling module `linear_q_lora`


def parallel_mode(linear: nn.Module) -> str:
    """column | row | none: how `linear` is split over its TP group (megatron-core's classes, or Transformer
    Engine's, which say it in `parallel_mode`)."""
    mode = getattr(linear, "parallel_mode", None)
    if mode in ("column", "row"):
        return mode
    if isinstance(linear, RowParallelLinear) or type(linear).__name__.endswith("RowParallelLinear"):
        return "row"
    if isinstance(linear, ColumnParallelLinear) or type(linear).__name__.endswith("ColumnParallelLinear"):
        return "column"
    return "none"


def _tp_group(linear: nn.Module):
    group = getattr(linear, "tp_group", None)
    return group if group is not None and group.size() > 1 else None


class LoRAAdapter(nn.Module):
    """The low-rank update of one linear: `lora_A` [rank, in_local], `lora_B` [out_local, rank].

    Built from the linear it adapts (its TP split, sequence parallelism and weight dtype / device). `scale`
    multiplies alpha / rank (what a user's `FILE:scale` sets when loading for inference)."""

    def __init__(self, linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                 seed: int = 0, scale: float = 1.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"LoRA init {init!r} is not one of {INITS}")
        self.mode = parallel_mode(linear)
        self.tp_group = _tp_group(linear)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self.sequence_parallel = bool(getattr(linear, "sequence_parallel", False)) and tp > 1
        self.rank, self.alpha, self.multiplier = rank, float(alpha), float(scale)
        weight = linear.weight
        out_local, in_local = weight.shape
        self.in_features = in_local * tp if self.mode == "row" else in_local  # the whole linear's sizes
        self.out_features = out_local * tp if self.mode == "column" else out_local
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        a, b = self.this_rank(*self._initial(init, seed, weight.device))
        self.lora_A = nn.Parameter(a.to(weight.dtype).contiguous())
        self.lora_B = nn.Parameter(b.to(weight.dtype).contiguous())
        if tp > 1 and self.mode == "row":
            set_tensor_model_parallel_attributes(self.lora_A, True, 1, 1)
            if self.sequence_parallel:  # B sees only this rank's tokens: megatron sums its gradient over TP
                self.lora_B.sequence_parallel = True
        elif tp > 1 and self.mode == "column":
            set_tensor_model_parallel_attributes(self.lora_B, True, 0, 1)

    def _initial(self, init: str, seed: int, device) -> tuple:
        """The whole A (peft's init) and a zero B, drawn on the CPU from `seed` (identical on every rank)."""
        g = torch.Generator().manual_seed(seed)
        a = torch.empty(self.rank, self.in_features)
        if init == "gaussian":
            a.normal_(0.0, 1.0 / self.rank, generator=g)
        else:  # nn.Linear's (and peft's default) kaiming-uniform with a = sqrt(5): bound 1 / sqrt(in)
            bound = 1.0 / math.sqrt(self.in_features)
            a.uniform_(-bound, bound, generator=g)
        return a.to(device), torch.zeros(self.out_features, self.rank, device=device)

    def this_rank(self, a: torch.Tensor, b: torch.Tensor) -> tuple:
        """This TP rank's slices of a whole A [rank, in] and B [out, rank]: a row adapter's A by columns, a column
        adapter's B by rows."""
        if self.tp_group is None:
            return a, b
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        if self.mode == "row":
            a = a.chunk(tp, dim=1)[rank]
        elif self.mode == "column":
            b = b.chunk(tp, dim=0)[rank]
        return a, b

    @property
    def scale(self) -> float:
        return self.alpha / self.rank * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update for the linear's input `x` (this rank's part of it), shaped like the linear's output."""
        group = self.tp_group
        x = self.dropout(x)
        if self.mode == "column":
            if self.sequence_parallel:  # the linear gathers its input: so does the adapter (gradient split back)
                x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
            h = F.linear(x, self.lora_A)
            if group is not None:  # the same on every rank; its gradient is the sum of every rank's part
                h = copy_to_tensor_model_parallel_region(h, group=group)
        else:
            h = F.linear(x, self.lora_A)
            if group is not None and self.mode == "row":
                h = (reduce_scatter_to_sequence_parallel_region(h, group=group) if self.sequence_parallel
                     else reduce_from_tensor_model_parallel_region(h, group=group))
        return F.linear(h, self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale · B A for this rank's shard of the linear's weight (what merging adds), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """dist_checkpointing view: the split matrix carries its TP axis, so adapters reshard like the model."""
        axis = {"column": {"lora_B": 0}, "row": {"lora_A": 1}}.get(self.mode, {}) if self.tp_group else {}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))

    def extra_repr(self) -> str:
        return (f"{self.mode}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}")


def _add_update(linear: nn.Module, args: tuple, output):
    """Forward hook of an adapted linear: its output plus the adapter's update (megatron's linears return
    (output, bias); the bias, when returned apart, is added by the caller and is left alone)."""
    adapter = linear._megawan_lora
    x = args[0]
    if isinstance(output, tuple):
        out, bias = output
        return (out + adapter(x).to(out.dtype), bias)
    return output + adapter(x).to(output.dtype)


def attach(parent: nn.Module, name: str, adapter: LoRAAdapter) -> None:
    """Make `adapter` the update of `parent.<name>`: registered as `parent.<name>_lora` (so it is saved,
    moved and counted with the model) and added to the linear's output by a forward hook."""
    linear = getattr(parent, name)
    if getattr(linear, "_megawan_lora", None) is not None:
        raise ValueError(f"{name} has a LoRA adapter already: merge it into the weights first (merge_lora)")
    parent.add_module(name + SUFFIX, adapter)
    object.__setattr__(linear, "_megawan_lora", adapter)  # not a submodule of the linear: its keys stay its own
    linear._megawan_lora_hook = linear.register_forward_hook(_add_update)


def detach(parent: nn.Module, name: str) -> LoRAAdapter:
    """Remove the adapter of `parent.<name>` (after merging it, or to unload it); returns it."""
    linear = getattr(parent, name)
    adapter = linear._megawan_lora
    linear._megawan_lora_hook.remove()
    object.__setattr__(linear, "_megawan_lora", None)
    del parent._modules[name + SUFFIX]
    return adapter


def adapter_seed(init_seed: int, global_name: str) -> int:
    """The seed of the adapter of the linear `global_name` (e.g. blocks.3.self_attention.linear_q)."""
    return zlib.crc32(f"{init_seed}/lora/{global_name}".encode())
