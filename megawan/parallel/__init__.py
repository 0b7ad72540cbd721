"""Process groups and the collectives the models need. Models receive groups; they never create them."""

from megawan.parallel.groups import (
    all_reduce_sum,
    initialize_model_parallel,
    tensor_parallel_group,
)

__all__ = ["all_reduce_sum", "initialize_model_parallel", "tensor_parallel_group"]
