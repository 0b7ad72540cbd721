"""Process-group lookup and autograd-aware collectives.

megatron-core layers take their tensor-parallel group explicitly; the model asks `tensor_parallel_group()`
once and hands the group to every layer, so the same code path serves TP = 1 and TP = N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


_PRIVATE_WORLD = {"active": False}


@dataclass
class ContextParallelGroups:
    """The groups a context-parallel attention uses: all-to-all over `ulysses` (heads scattered), K/V passed
    around `ring`; either may be a one-rank group. `group` is the whole CP group (this rank's sequence chunk
    is its rank there)."""

    group: object
    mode: str
    ulysses: object = None
    ring: object = None

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


_CONTEXT_PARALLEL: dict = {"groups": None}
_SEQUENCE_PARALLEL: dict = {"enabled": False}


def sequence_parallel_enabled() -> bool:
    """Whether activations between the TP linears are split along the sequence over the TP group."""
    return _SEQUENCE_PARALLEL["enabled"]


def set_sequence_parallel(enabled: bool) -> None:
    _SEQUENCE_PARALLEL["enabled"] = bool(enabled)


def context_parallel_groups():
    """This rank's ContextParallelGroups, or None without context parallelism."""
    return _CONTEXT_PARALLEL["groups"]


def set_context_parallel_groups(groups) -> None:
    _CONTEXT_PARALLEL["groups"] = groups


def _start_single_process_world() -> None:
    """A one-rank gloo world for a lone process: megatron-core's layers need torch.distributed even at TP=1.

    Started on first use, in memory (HashStore: no port, no files); `megawan.parallel.initialize` replaces it
    when a real multi-process job starts.
    """
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    _PRIVATE_WORLD["active"] = True


def tensor_parallel_group():
    """This rank's tensor-parallel group.

    With megatron's parallel_state set up: its TP group. In a lone process: a one-rank world, started here
    if needed, so that `WanDiT(config)` needs no set-up at all.
    """
    if not dist.is_initialized():
        _start_single_process_world()
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size() == 1:
        return dist.group.WORLD
    raise RuntimeError(
        "torch.distributed runs on several ranks but megatron-core's model parallelism is not set up: "
        "call megawan.parallel.initialize(ParallelConfig(...)) first"
    )


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose result each rank uses differently; so the backward is a sum over ranks too.

    (megatron's reduce_from_tensor_model_parallel_region has an identity backward because every rank then
    computes the same thing with the result; for q/k RMSNorm statistics every rank normalises its own slice.)
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or group.size() == 1:
        return x
    return _AllReduceSum.apply(x, group)
