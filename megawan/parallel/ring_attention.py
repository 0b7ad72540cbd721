"""Ring attention: every rank keeps its queries while the K/V blocks travel once around the ring.

Each step attends the local queries over the block at hand with a kernel that also returns the
log-sum-exp (block_attention: flash on CUDA, torch's flash kernel on CPU, a tiled fallback), and merges it
into the running output through the LSE in >= fp32. No [L, L_block] score matrix exists outside a
kernel's bounded tiles. The next block is already in flight while this one is computed (double buffers,
one P2P batch per hop).

Padding sits only at the end of the global sequence, so the keys of a block at global positions >= valid
are dropped by slicing the block (an all-padding block is skipped), and the kernels run maskless.

Backward: from the saved output and LSE each step recomputes its block's probabilities inside the kernel
(`attention_with_lse_backward`). The block's dK/dV accumulator travels with it: it is sent on only after
this step's share has been added, and after `world` hops it is back at the block's owner.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megawan.parallel.block_attention import (attention_with_lse, attention_with_lse_backward, compute_dtype,
                                              merge_attention)

_KV_TAG, _GRAD_TAG = 0, 1  # the K/V blocks and the dK/dV accumulators are separate streams of messages


class _Ring:
    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def shift(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Post: `send` to the next rank, the previous rank's tensor into `recv`. Returns the works to wait on."""
        return dist.batch_isend_irecv([
            dist.P2POp(dist.isend, send, group=self.group, group_peer=(self.rank + 1) % self.world, tag=tag),
            dist.P2POp(dist.irecv, recv, group=self.group, group_peer=(self.rank - 1) % self.world, tag=tag),
        ])

    def block(self, step: int) -> int:
        """Which rank's K/V block this rank holds at `step` (each hop brings the previous rank's)."""
        return (self.rank - step) % self.world


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _valid_keys(block: int, block_len: int, valid: Optional[int]) -> int:
    """How many leading keys of `block` are real tokens (the rest, if any, is padding)."""
    if valid is None:
        return block_len
    return max(0, min(block_len, valid - block * block_len))


class _RingAttention(torch.autograd.Function):
    """q, k, v: [b, h, L, d], this rank's block of a sequence split over the ring in rank order."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale, valid):
        ring = _Ring(group)
        dtype = compute_dtype(q)
        acc_dtype = torch.promote_types(dtype, torch.float32)
        qc = q.to(dtype)
        kv = torch.stack([k.to(dtype), v.to(dtype)])  # one contiguous message per hop
        kv_next = torch.empty_like(kv)
        out = lse = None
        for step in range(ring.world):
            last = step == ring.world - 1
            works = [] if last else ring.shift(kv, kv_next, _KV_TAG)  # the next block travels meanwhile
            n = _valid_keys(ring.block(step), kv.shape[-2], valid)
            if n:
                block_out, block_lse = attention_with_lse(qc, kv[0, ..., :n, :], kv[1, ..., :n, :], scale)
                out, lse = merge_attention(out, lse, block_out, block_lse.to(acc_dtype))
            _wait(works)
            kv, kv_next = kv_next, kv
        ctx.save_for_backward(q, k, v, out.to(dtype), lse)
        ctx.args = (group, scale, valid)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, valid = ctx.args
        ring = _Ring(group)
        dtype = out.dtype
        qc = q.to(dtype)
        # dO in out's memory layout: flash's backward wants the two alike and would copy them at every step
        do = torch.empty_like(out).copy_(grad_out)
        kv = torch.stack([k.to(dtype), v.to(dtype)])
        kv_next = torch.empty_like(kv)
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        # the dK/dV accumulator of the block at hand; it starts as zeros at the block's owner (step 0)
        dkv = torch.zeros(kv.shape, dtype=lse.dtype, device=q.device)
        dkv_next = torch.empty_like(dkv)
        grad_works = []
        for step in range(ring.world):
            last = step == ring.world - 1
            kv_works = [] if last else ring.shift(kv, kv_next, _KV_TAG)
            n = _valid_keys(ring.block(step), kv.shape[-2], valid)
            share = None
            if n:  # this rank's share of the block's gradients, while the next block travels
                share = attention_with_lse_backward(do, qc, kv[0, ..., :n, :], kv[1, ..., :n, :], out, lse, scale)
            _wait(grad_works)  # the accumulator of this block, from the previous rank (and our last send done)
            if share is not None:
                dq += share[0]
                dkv[0, ..., :n, :] += share[1]
                dkv[1, ..., :n, :] += share[2]
            # on with it only now that this rank's share is in; the last of these hops takes it home
            grad_works = ring.shift(dkv, dkv_next, _GRAD_TAG)
            dkv, dkv_next = dkv_next, dkv
            _wait(kv_works)
            kv, kv_next = kv_next, kv
        _wait(grad_works)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q, k, v, group, scale: float, valid: Optional[int] = None):
    """Attention of this rank's queries over the keys of every rank of `group` ([b, h, L, d] each); keys at
    global positions >= valid (padding at the end of the sequence) are not attended."""
    if valid is not None and valid < 1:
        raise ValueError(f"ring_attention: valid={valid}, but at least one key must be a real token")
    return _RingAttention.apply(q, k, v, group, scale, valid)
