"""Context parallelism for the `local` backend: the video tokens are split over CP ranks in contiguous
chunks, and self-attention is exchanged across them in one of three ways.

- Ulysses (all-to-all): trade a sequence chunk of every head for the whole sequence of 1/CP of the heads,
  attend locally, trade back. Two all-to-alls each way; heads must divide by CP.
- Ring: keep the queries, pass K/V blocks around the ring and merge partial attentions through their
  log-sum-exp, computed by flash-style kernels; the next block travels while this one is computed. The
  backward passes dK/dV accumulators around the same ring (ring_attention.py).
- 2D: Ulysses inside a group of ranks (fast links, a node), ring across the groups (the Wan report's layout).

A token count that CP does not divide is padded at the end; padded keys are masked out (the ring drops
them from its blocks instead). Megatron's convention for masks is kept: True = not attended.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import fp8_attention
from megawan.parallel.groups import ContextParallelGroups
from megawan.parallel.ring_attention import ring_attention

__all__ = ["all_to_all", "context_parallel_attention", "gather_sequence", "pad_sequence", "padded_length",
           "ring_attention", "split_sequence"]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


# ----------------------------------------------------------------------------------------------
# all-to-all and sequence gather, with their backward


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad, group, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x along scatter_dim over the group, concatenate what arrives along gather_dim."""
    if _size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _GatherSequence(torch.autograd.Function):
    """Forward: concatenate every rank's chunk along dim 0. Backward: each rank keeps the gradient of its own
    chunk (every rank computes the same thing from the gathered tensor)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=0)[rank].contiguous(), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    return _GatherSequence.apply(x, group)


def padded_length(tokens: int, cp_size: int) -> int:
    return math.ceil(tokens / cp_size) * cp_size


def pad_sequence(x: torch.Tensor, multiple: int, dim: int = 0) -> torch.Tensor:
    """Zero-pad x along dim to a multiple of `multiple`."""
    n = x.shape[dim]
    pad = padded_length(n, multiple) - n
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def split_sequence(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 0) -> torch.Tensor:
    """Pad x along dim to a multiple of cp_size (zeros at the end) and take this rank's contiguous chunk."""
    return pad_sequence(x, cp_size, dim).chunk(cp_size, dim=dim)[cp_rank]


# ----------------------------------------------------------------------------------------------


def context_parallel_attention(query, key, value, cp: ContextParallelGroups, valid_tokens: Optional[int] = None,
                               scale: Optional[float] = None, fp8: bool = False) -> torch.Tensor:
    """Self-attention over a sequence split across CP ranks.

    query / key / value: [L, b, heads, d], this rank's contiguous chunk (rank order = sequence order);
    valid_tokens: how many leading tokens of the padded global sequence are real (None: all). fp8: the
    caller's choice of FP8 products (train.fp8_attention), honoured where the FP8 kernel applies (below).
    Returns [L, b, heads * d].
    """
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    # Ulysses: [L, b, h, d] -> [L * U, b, h / U, d]; the gathered chunks are contiguous in the sequence
    q, k, v = (all_to_all(t, cp.ulysses, scatter_dim=2, gather_dim=0) for t in (query, key, value))
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h', L', d]
    if _size(cp.ring) > 1:
        out = ring_attention(q, k, v, cp.ring, scale, valid_tokens)
    else:
        mask = None
        if valid_tokens is not None and valid_tokens < k.shape[-2]:
            mask = (torch.arange(k.shape[-2], device=k.device) < valid_tokens).view(1, 1, 1, -1)  # True = attend
        if fp8 and mask is None:
            # after the all-to-all each rank holds whole sequences of its heads, so the FP8 kernel's per-head,
            # per-128-token quantisation blocks are those of one rank (ring and padded sequences stay in
            # bf16 / fp32: the kernel's bf16 backward knows no key mask)
            out = fp8_attention(q, k, v, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = out.permute(2, 0, 1, 3)  # [L', b, h', d]
    out = all_to_all(out, cp.ulysses, scatter_dim=0, gather_dim=2)
    return out.flatten(2)
