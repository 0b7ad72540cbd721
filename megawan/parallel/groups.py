"""Process-group lookup and autograd-aware collectives.

megatron-core layers take their tensor-parallel group explicitly; the model asks `tensor_parallel_group()`
once and hands the group to every layer, so the same code path serves TP = 1 and TP = N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


_PRIVATE_WORLD = {"active": False}


def _start_single_process_world() -> None:
    """A one-rank gloo world for a lone process: megatron-core's layers need torch.distributed even at TP=1.

    Started on first use, in memory (HashStore: no port, no files); `initialize_model_parallel` replaces it
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
        "call megawan.parallel.initialize_model_parallel(tensor_parallel=N) first"
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


def initialize_model_parallel(tensor_parallel: int = 1, backend: str | None = None) -> None:
    """Start torch.distributed from torchrun's or Slurm's environment and set up megatron-core groups.

    Single process (no RANK / SLURM_PROCID in the environment) with tensor_parallel=1 needs nothing and
    returns without initializing anything.
    """
    import os

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun: derive torchrun's variables
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env:
        if tensor_parallel != 1:
            raise RuntimeError(
                f"tensor_parallel={tensor_parallel} needs {tensor_parallel} processes: launch with torchrun or srun"
            )
        return
    if _PRIVATE_WORLD["active"]:  # a lone process's one-rank world: make way for the real job
        dist.destroy_process_group()
        _PRIVATE_WORLD["active"] = False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend=backend, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]))
    world = dist.get_world_size()
    if world % tensor_parallel != 0:
        raise RuntimeError(f"world size {world} is not divisible by tensor_parallel={tensor_parallel}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
