"""How megawan's checkpoints write their tensors: megatron-core's torch_dist save strategy, adapted for CPU-only
ranks over gloo and for background writes (a snapshot that training cannot change). The files and their
metadata are megatron's; megawan.checkpoint (the format: names, folders, `latest`) is the only caller.

    dist_checkpointing.save(sharded, folder, sharded_strategy=save_strategy(snapshot=True), async_sharded_save=True)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_finalize
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.utils import _get_failure_dict

from megawan.capabilities import cuda_available


def snapshot_write_buckets(write_buckets: list) -> list:
    """megatron's write buckets with every tensor replaced by a host copy that training cannot change: what a
    background write reads while the next steps run. megatron's own preload is `tensor.to("cpu")`, which for a
    CPU tensor returns the tensor itself (the live weights and Adam moments the optimizer keeps changing in
    place); so CPU tensors are cloned, CUDA tensors are copied into pinned host memory without blocking and
    waited for once at the end. Called synchronously, before the step loop continues."""
    out, on_cuda = [], False
    for file_name, storage_key, (bytes_data, tensor_data) in write_buckets:
        copies = []
        for item, tensor in tensor_data:
            if tensor.device.type == "cpu":
                copy = tensor.detach().clone()
            else:
                copy = torch.empty_like(tensor, device="cpu", pin_memory=True)
                copy.copy_(tensor.detach(), non_blocking=True)
                on_cuda = True
            copies.append((item, copy))
        out.append((file_name, storage_key, (bytes_data, copies)))
    if on_cuda:
        torch.cuda.synchronize()  # the copies are complete before the step loop may change the weights
    return out


class SaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist save strategy (same files and metadata) with two changes:

    - snapshot=True (a background write): the preload takes real copies (snapshot_write_buckets); megatron's
      would hand the background writer the live CPU tensors.
    - on CPU-only ranks over gloo, megatron's two CUDA calls are replaced: it stages tensors with non-blocking
      copies followed by torch.cuda.synchronize(), and broadcasts write failures in a CUDA tensor; a CPU-only
      torch refuses both.
    """

    def __init__(self, snapshot: bool):
        super().__init__("torch_dist", 1)
        self.snapshot = snapshot

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret) -> AsyncRequest:
        if cuda_available() and not self.snapshot:
            return super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        save_fn, preload_fn, save_args = writer.get_save_function_and_args()
        storage_writer, global_metadata, dist_wrapper = save_state_dict_ret

        def preload():
            if self.snapshot:
                return snapshot_write_buckets(writer.write_buckets)
            return writer.preload_tensors(writer.write_buckets, non_blocking=False)

        def finalize():
            if cuda_available():
                return save_state_dict_async_finalize(*save_state_dict_ret)
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


def save_strategy(snapshot: bool = False):
    return None if cuda_available() and not snapshot else SaveStrategy(snapshot)
