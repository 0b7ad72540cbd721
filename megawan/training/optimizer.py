"""Data parallelism with megatron-core's DistributedDataParallel and its (distributed) optimizer.

    chunks = wrap_data_parallel(build_model_chunks(cfg, parallel), overlap=Overlap.resolve(parallel))
    optimizer = build_optimizer(chunks, lr=1e-4, weight_decay=0.01, clip_grad=1.0)

The two belong together: with the distributed optimizer DDP's gradient buffers are reduce-scattered, the fp32
main weights and Adam moments live sharded over the data-parallel x context-parallel group, and updated
weights are all-gathered. Gradients are averaged over that group (megatron's schedules multiply each loss by
the CP size to compensate). On a CPU torch it runs under megawan.parallel.cpu_compat.megatron_cpu_mode().

Overlap (`parallel.overlap_grad_reduce` / `overlap_param_gather`, on by default where CUDA is): gradients are
reduce-scattered bucket by bucket while the backward still runs, and after `optimizer.step()` each rank holds
only its own shard of the new weights until the next forward's pre-hooks all-gather them bucket by bucket.
Whatever reads the weights before that forward (EMA, checkpoint, validation) calls `finish_param_gather`.
Both are plain asynchronous collectives (no CUDA stream of megawan's), so they also run over gloo.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megawan.capabilities import cuda_available
from megawan.config import ConfigError, ParallelConfig
from megawan.training.schedule import finalize_model_grads


@dataclasses.dataclass(frozen=True)
class Overlap:
    """What megatron's DDP overlaps with compute, settled for this machine."""

    grad_reduce: bool = False
    param_gather: bool = False
    bucket_size: Optional[int] = None  # parameters per bucket (None: megatron's default)

    @classmethod
    def resolve(cls, parallel: ParallelConfig) -> "Overlap":
        """parallel.overlap_*: unset means on where CUDA is (overlap pays off against GPU compute), off on CPU,
        where megawan's runs are tests and demos that keep the synchronous, single-bucket numerics."""
        grad = cuda_available() if parallel.overlap_grad_reduce is None else parallel.overlap_grad_reduce
        param = grad and cuda_available() if parallel.overlap_param_gather is None else parallel.overlap_param_gather
        return cls(grad, param, parallel.ddp_bucket_size)


def wrap_data_parallel(chunks: list, distributed_optimizer: bool = True, overlap: Overlap = Overlap()) -> list:
    if overlap.param_gather and not distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather: needs the distributed optimizer (it all-gathers the "
                          "weight shards each rank's optimizer updated); set it false")
    if overlap.param_gather and not overlap.grad_reduce:
        raise ConfigError("parallel.overlap_param_gather: needs parallel.overlap_grad_reduce")
    interleaved = len(chunks) > 1
    if overlap.grad_reduce and (interleaved or parallel_state.get_pipeline_model_parallel_world_size() > 1):
        _own_buckets_for_pipeline_shared(chunks)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap.grad_reduce, overlap_param_gather=overlap.param_gather,
        # interleaved 1F1B: the schedule starts each chunk's all-gather at the same micro-batch on every stage
        # (config.param_sync_func below), as Megatron-LM does by default
        align_param_gather=overlap.param_gather and interleaved, bucket_size=overlap.bucket_size,
    )
    # chunks after the first are one bucket each: their reduction is off the critical path (Megatron-LM's choice)
    wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=(i > 0))
               for i, chunk in enumerate(chunks)]
    config = chunks[0].config

    def per_chunk(method: str):
        funcs = [getattr(c, method) for c in wrapped]
        return funcs if interleaved else funcs[0]

    config.no_sync_func = per_chunk("no_sync")
    if overlap.grad_reduce:  # pipeline schedules start each chunk's reduction when its last backward is done
        config.grad_sync_func = per_chunk("start_grad_sync")
    if overlap.param_gather and interleaved:
        config.param_sync_func = per_chunk("start_param_sync")
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def _own_buckets_for_pipeline_shared(chunks: list) -> None:
    """Give every pipeline-shared parameter (the text / time embeddings each chunk holds a copy of) a bucket of its
    own. Under overlap_grad_reduce their data-parallel reduce-scatter starts during the backward, before the copies'
    gradients are summed over chunks and stages; megatron shards a one-parameter bucket alike on every chunk and
    stage, so summing after the reduction (megawan.training.schedule.finalize_model_grads) stays exact. megatron
    does the same for a shared word embedding, through this attribute."""
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "pipeline_shared", False):
                p.shared_embedding = True


def finish_param_gather(chunks: list) -> None:
    """Make every weight of the DDP-wrapped `chunks` current. With overlap_param_gather the optimizer step updates
    only this rank's shard; the rest arrives during the next forward. Collective over the data-parallel group."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)  # waits for an all-gather in flight, or runs one


def build_optimizer(chunks: list, lr: float, weight_decay: float = 0.0, clip_grad: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8, distributed_optimizer: bool = True, bf16: bool = False,
                    min_lr: float = 0.0):
    """megatron-core's AdamW over DDP-wrapped chunks (apex / TE fused kernels when installed, torch otherwise)."""
    ddp_config = chunks[0].ddp_config
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, clip_grad=clip_grad, adam_beta1=betas[0],
        adam_beta2=betas[1], adam_eps=eps, use_distributed_optimizer=distributed_optimizer,
        params_dtype=chunks[0].config.params_dtype, bf16=bf16,  # bf16: fp32 main weights in the optimizer
        overlap_param_gather=ddp_config.overlap_param_gather,  # megatron wants the DDP's value mirrored here
    )
    return get_megatron_optimizer(config, chunks)
