"""The job's parallel machinery, below the models: process groups and autograd-aware collectives (groups),
`initialize()` for torchrun / Slurm / a lone process (initialize), `spawn_local` for N local gloo ranks
(launch), context-parallel attention (context_parallel) and megatron-core on a CPU torch (cpu_compat).

Models receive groups; they never create them. What is specific to the DiT (pipeline chunks, recompute,
offload) lives beside it in megawan.models.dit.parallelize; schedules, DDP and the optimizer in
megawan.training.
"""

from megawan.parallel.groups import (
    ContextParallelGroups,
    all_reduce_sum,
    context_parallel_groups,
    tensor_parallel_group,
)
from megawan.parallel.initialize import initialize

__all__ = ["ContextParallelGroups", "all_reduce_sum", "context_parallel_groups", "initialize", "tensor_parallel_group"]
