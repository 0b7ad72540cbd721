"""Process groups and the collectives the models need. Models receive groups; they never create them."""

from megawan.parallel.groups import (
    ContextParallelGroups,
    all_reduce_sum,
    context_parallel_groups,
    tensor_parallel_group,
)
from megawan.parallel.initialize import initialize

__all__ = ["ContextParallelGroups", "all_reduce_sum", "context_parallel_groups", "initialize", "tensor_parallel_group"]
