"""Model checkpoints in megatron-core dist_checkpointing format, loadable under any TP layout.

    save_model(model, "ckpt/iter_0000100")      # every rank calls it; written to a temp name, then renamed
    load_model(model, "ckpt/iter_0000100")      # any TP size: each rank reads its own shards

A directory only ever appears under its final name once every rank has finished writing it, so a reader
never sees a half-written checkpoint. (The trainer adds optimizer, EMA, loader state and `latest`.)
"""

from __future__ import annotations

import os
import shutil
import warnings


import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.utils import _get_failure_dict

from megawan.capabilities import cuda_available


class _CpuTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist save strategy without its two CUDA calls, for CPU-only ranks over gloo.

    megatron stages tensors with non-blocking copies followed by torch.cuda.synchronize(), and broadcasts
    write failures in a CUDA tensor; a CPU-only torch refuses both. Files and metadata are the same.
    """

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret) -> AsyncRequest:
        save_fn, preload_fn, save_args = writer.get_save_function_and_args()
        storage_writer, global_metadata, dist_wrapper = save_state_dict_ret

        def preload():
            return writer.preload_tensors(writer.write_buckets, non_blocking=False)

        def finalize():
            all_results = dist_wrapper.gather_object(storage_writer.retrieve_write_results())
            failures = {}
            if dist_wrapper.is_coordinator:
                failures = _get_failure_dict(all_results)
                if not failures:
                    storage_writer.finish(global_metadata, all_results)
            failed = torch.tensor([int(bool(failures))], dtype=torch.int)
            dist.broadcast(failed, src=dist_wrapper.coordinator_rank, group=dist_wrapper.group)
            if failed.item():
                raise CheckpointException("write", failures)

        return AsyncRequest(save_fn, save_args, [finalize], preload_fn=preload if preload_fn else None)


def _save_strategy():
    return None if cuda_available() else _CpuTorchDistSaveStrategy("torch_dist", 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(model, path: str) -> str:
    """Write model.sharded_state_dict() to `path` (a directory), atomically. Collective: call on every rank."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp"
    if _rank() == 0:
        if os.path.exists(path):
            raise FileExistsError(f"checkpoint {path} exists already")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), tmp, sharded_strategy=_save_strategy())
    _barrier()
    if _rank() == 0:
        os.rename(tmp, path)
    _barrier()
    return path


def load_model(model, path: str) -> None:
    """Load a checkpoint written by save_model at any TP size into `model` (this rank's shards)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    with warnings.catch_warnings():  # torch's deprecation notice inside megatron's loader, not ours to act on
        warnings.simplefilter("ignore", FutureWarning)
        state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state)


__all__ = ["save_model", "load_model"]
