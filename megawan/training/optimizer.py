"""Data parallelism with megatron-core's DistributedDataParallel and its (distributed) optimizer.

    chunks = wrap_data_parallel(build_model_chunks(cfg, parallel), distributed_optimizer=True)
    optimizer = build_optimizer(chunks, lr=1e-4, weight_decay=0.01, clip_grad=1.0)

The two belong together: with the distributed optimizer DDP's gradient buffers are reduce-scattered, the fp32
main weights and Adam moments live sharded over the data-parallel x context-parallel group, and updated
weights are all-gathered. Gradients are averaged over that group (megatron's schedules multiply each loss by
the CP size to compensate). On a CPU torch it runs under megawan.parallel.cpu_compat.megatron_cpu_mode().
"""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megawan.training.schedule import finalize_model_grads


def wrap_data_parallel(chunks: list, distributed_optimizer: bool = True) -> list:
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, overlap_grad_reduce=False, grad_reduce_in_fp32=True,
    )
    wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=(i > 0))
               for i, chunk in enumerate(chunks)]
    config = chunks[0].config
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(chunks: list, lr: float, weight_decay: float = 0.0, clip_grad: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8, distributed_optimizer: bool = True, bf16: bool = False,
                    min_lr: float = 0.0):
    """megatron-core's AdamW over DDP-wrapped chunks (apex / TE fused kernels when installed, torch otherwise)."""
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, clip_grad=clip_grad, adam_beta1=betas[0],
        adam_beta2=betas[1], adam_eps=eps, use_distributed_optimizer=distributed_optimizer,
        params_dtype=chunks[0].config.params_dtype, bf16=bf16,  # bf16: fp32 main weights in the optimizer
    )
    return get_megatron_optimizer(config, chunks)
