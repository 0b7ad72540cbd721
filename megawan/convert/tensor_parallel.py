"""Split a full megawan state dict into tensor-parallel shards and merge shards back.

Which axis each parameter splits on is the TP_AXIS table; everything else is replicated (and must be
identical on every shard when merged).
"""

from __future__ import annotations

import torch


def tp_axis(key: str, axis_table: dict):
    for suffix, axis in axis_table.items():
        if key.endswith(suffix):
            return axis
    return None


def split_tensor_parallel(state_dict: dict, tp_size: int, axis_table: dict) -> list:
    """Full state dict -> [shard of rank 0, …, shard of rank tp_size-1]."""
    shards = [{} for _ in range(tp_size)]
    for key, tensor in state_dict.items():
        axis = tp_axis(key, axis_table)
        if axis is None:
            for shard in shards:
                shard[key] = tensor
            continue
        if tensor.shape[axis] % tp_size:
            raise ValueError(f"{key}: dimension {axis} of size {tensor.shape[axis]} does not split into {tp_size} TP ranks")
        for shard, part in zip(shards, torch.chunk(tensor, tp_size, dim=axis)):
            shard[key] = part.contiguous()
    return shards


def merge_tensor_parallel(shards: list, axis_table: dict) -> dict:
    """[shard of rank 0, …] -> full state dict. Replicated tensors must agree across shards."""
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise ValueError(f"TP shard {rank} has different keys from shard 0, e.g. {diff[:3]}")
    merged = {}
    for key in keys:
        axis = tp_axis(key, axis_table)
        parts = [shard[key] for shard in shards]
        if axis is None:
            for rank, part in enumerate(parts[1:], start=1):
                if not torch.equal(part, parts[0]):
                    raise ValueError(f"{key}: replicated tensor differs between TP shard 0 and shard {rank}")
            merged[key] = parts[0]
        else:
            merged[key] = torch.cat(parts, dim=axis)
    return merged
