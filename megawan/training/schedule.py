"""Forward and backward over the micro-batches through megatron-core's schedules (no pipelining, 1F1B,
interleaved 1F1B), and the gradient reduction that ends them.

    results = forward_backward(chunks, forward_step, iterators, num_microbatches, tokens, micro_batch_size)

The pipeline-shared embeddings (every chunk embeds text and timestep itself: megawan.models.dit.parallelize)
get their gradients summed over this rank's chunks and the PP group before megatron's data-parallel
reduction; megawan.training.optimizer installs `finalize_model_grads` for that on the DDP-wrapped chunks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection

from megawan.parallel.cpu_compat import p2p_communicator


def reduce_pipeline_shared_grads(chunks: list) -> None:
    """Sum the gradients of pipeline-shared parameters over this rank's chunks and over the PP group, and
    give every copy the sum. Works on megatron DDP's `main_grad` when present, else on `.grad`. Frozen ones (a
    LoRA run's base) have no gradient."""
    pipelined = parallel_state.model_parallel_is_initialized() and \
        parallel_state.get_pipeline_model_parallel_world_size() > 1
    if len(chunks) == 1 and not pipelined:
        return  # one copy of each: nothing to sum
    named = [dict(chunk.named_parameters()) for chunk in chunks]
    names = [n for n, p in named[0].items() if getattr(p, "pipeline_shared", False) and p.requires_grad]
    if not names:
        return

    def grad_of(p):
        return p.main_grad if hasattr(p, "main_grad") else p.grad

    flat = torch.cat([sum(grad_of(params[n]) for params in named).reshape(-1) for n in names])
    if pipelined:
        dist.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    offset = 0
    for n in names:
        size = named[0][n].numel()
        for params in named:
            grad_of(params[n]).copy_(flat[offset:offset + size].view_as(params[n]))
        offset += size


def finalize_model_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """megatron's finalize_model_grads (DP / CP reduction, …) and the pipeline-shared sum. The sum comes first,
    except under overlap_grad_reduce: there the DP reduction already started during the backward, so the sum
    follows it (exact, as the shared parameters have buckets of their own: megawan.training.optimizer)."""
    if not getattr(getattr(model[0], "ddp_config", None), "overlap_grad_reduce", False):
        reduce_pipeline_shared_grads(model)
        return megatron_finalize_model_grads(model, num_tokens, pg_collection, force_all_reduce)
    result = megatron_finalize_model_grads(model, num_tokens, pg_collection, force_all_reduce)
    reduce_pipeline_shared_grads(model)
    return result


def forward_backward(chunks: list, forward_step: Callable, data_iterators: list, num_microbatches: int,
                     tokens: int, micro_batch_size: int, forward_only: bool = False) -> list:
    """Run megatron's schedule for this layout over `num_microbatches` micro-batches.

    forward_step(data_iterator, model) -> (output, loss_fn), megatron's contract. `tokens` is the video
    token count (padded as the model pads it for CP). Returns the last stage's per-micro-batch loss dicts.
    """
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
