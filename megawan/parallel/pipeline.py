"""Pipeline parallelism of the Wan DiT through megatron-core's schedules (1F1B and interleaved 1F1B).

Each PP rank builds `virtual_pipeline` (or 1) chunks; chunk c of rank r holds the blocks of global chunk
c * PP + r (megatron's interleaved assignment). The first chunk of the first rank embeds the patches, the
last chunk of the last rank holds the head; every chunk embeds text and timestep itself, so only the
video tokens travel between stages and the P2P tensor is megatron's usual [s, b, hidden]. The gradients of
those pipeline-shared embeddings are summed over chunks and stages before the data-parallel reduction, and
all but one copy are marked `shared` so that the gradient norm counts them once.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megawan.config import DiTConfig, ParallelConfig
from megawan.models.dit.model import WanDiT
from megawan.parallel.cpu_compat import p2p_communicator

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def build_model_chunks(config: DiTConfig, parallel: ParallelConfig) -> list:
    """This pipeline rank's model chunks (one without interleaving)."""
    pp = parallel.pipeline_parallel
    vp = parallel.virtual_pipeline or 1
    rank = parallel_state.get_pipeline_model_parallel_rank() if pp > 1 else 0
    per_chunk = config.num_layers // (pp * vp)
    chunks = []
    for c in range(vp):
        first = (c * pp + rank) * per_chunk
        chunk = WanDiT(config, layers=range(first, first + per_chunk),
                       pre_process=(rank == 0 and c == 0), post_process=(rank == pp - 1 and c == vp - 1),
                       pipeline_parallel=pp, virtual_pipeline=parallel.virtual_pipeline)
        chunks.append(chunk)
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "pipeline_shared", False) and not chunk.pre_process:
                p.shared = True  # megatron's gradient norm skips `shared` copies
    return chunks


def chunk_state_dict(state_dict: dict, chunk: WanDiT) -> dict:
    """The part of a full (megawan, this TP rank's) state dict that `chunk` holds, with local block numbers."""
    local = {g: i for i, g in enumerate(chunk.layers)}
    own = set(chunk.state_dict())
    out = {}
    for key, value in state_dict.items():
        m = _BLOCK.match(key)
        if m:
            if int(m.group(1)) in local:
                out[f"blocks.{local[int(m.group(1))]}.{m.group(2)}"] = value
        elif key in own:
            out[key] = value
    return out


def reduce_pipeline_shared_grads(chunks: list) -> None:
    """Sum the gradients of pipeline-shared parameters over this rank's chunks and over the PP group, and
    give every copy the sum. Works on megatron DDP's `main_grad` when present, else on `.grad`."""
    named = [dict(chunk.named_parameters()) for chunk in chunks]
    names = [n for n, p in named[0].items() if getattr(p, "pipeline_shared", False)]
    if not names:
        return

    def grad_of(p):
        return p.main_grad if hasattr(p, "main_grad") else p.grad

    flat = torch.cat([sum(grad_of(params[n]) for params in named).reshape(-1) for n in names])
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    offset = 0
    for n in names:
        size = named[0][n].numel()
        for params in named:
            grad_of(params[n]).copy_(flat[offset:offset + size].view_as(params[n]))
        offset += size


def finalize_model_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """megatron's finalize_model_grads (DP / CP reduction, …), preceded by the pipeline-shared sum."""
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    reduce_pipeline_shared_grads(model)
    return megatron_finalize(model, num_tokens, pg_collection, force_all_reduce)


def forward_backward(chunks: list, forward_step: Callable, data_iterators: list, num_microbatches: int,
                     tokens: int, micro_batch_size: int, forward_only: bool = False) -> list:
    """Run megatron's schedule for this layout over `num_microbatches` micro-batches.

    forward_step(data_iterator, model) -> (output, loss_fn), megatron's contract. `tokens` is the video
    token count (padded as the model pads it for CP). Returns the last stage's per-micro-batch loss dicts.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection

    config = chunks[0].config
    cp = parallel_state.get_context_parallel_world_size()
    sp = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
    multiple = cp * sp
    seq_length = -(-tokens // multiple) * multiple  # the schedule divides by CP (and TP under SP)
    kwargs = {}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        kwargs = dict(
            p2p_communicator=p2p_communicator(parallel_state.get_pipeline_model_parallel_group(), config),
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(["tp", "cp", "embd", "pos_embd", "pp", "dp_cp"]),
        )
    schedule = get_forward_backward_func()
    return schedule(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(chunks) > 1 else data_iterators[0],
        model=chunks, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only, **kwargs,
    )
