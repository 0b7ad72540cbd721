"""One device per rank: a device argument made concrete, models built where they run (megatron's CPU
initialisation on the CPU, its per-shard GPU initialisation on CUDA, with Wan's xavier bound of the whole
weight either way)."""

import math

import pytest
import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megawan.capabilities import cuda_available, rank_device, resolve_device
from megawan.config import ParallelConfig, dit_preset
from megawan.models.dit.model import megatron_config, xavier_uniform_whole
from megawan.models.dit.parallelize import build_model_chunks


def test_a_device_argument_is_made_concrete():
    assert resolve_device(None) == resolve_device("auto") == rank_device()
    assert resolve_device("cpu") == torch.device("cpu")
    if cuda_available():
        assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    else:
        assert rank_device() == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device here"):
            resolve_device("cuda")


def test_models_are_built_on_their_device():
    cfg = dit_preset("tiny")
    (chunk,) = build_model_chunks(cfg, ParallelConfig(), device="cpu")
    assert {p.device for p in chunk.parameters()} == {torch.device("cpu")}
    assert chunk.config.use_cpu_initialization  # the whole master weight, then split: any TP size alike
    # on CUDA megatron creates each shard on the GPU (no host copy first)
    assert not megatron_config(cfg, 2, device=torch.device("cuda", 0)).use_cpu_initialization
    if cuda_available():
        (chunk,) = build_model_chunks(cfg, ParallelConfig())
        assert {p.device for p in chunk.parameters()} == {rank_device()}


@pytest.mark.parametrize("partition_dim", [0, 1])
def test_a_tensor_parallel_shard_gets_the_xavier_bound_of_the_whole_weight(partition_dim):
    """GPU initialisation hands the init a quarter of a [256, 256] weight; its values stay within the whole
    weight's bound sqrt(6 / 512) (the shard's own fans would allow sqrt(6 / 320), 27 % wider)."""
    torch.manual_seed(0)
    shard = torch.empty(64, 256) if partition_dim == 0 else torch.empty(256, 64)
    set_tensor_model_parallel_attributes(shard, is_parallel=True, dim=partition_dim, stride=1)
    xavier_uniform_whole(shard, tensor_parallel=4)
    bound = math.sqrt(6 / 512)
    assert bound * 0.99 < shard.abs().max() <= bound
    whole = torch.empty(256, 256)  # the CPU path: unmarked, plain xavier
    torch.manual_seed(0)
    expected = torch.nn.init.xavier_uniform_(torch.empty(256, 256))
    torch.manual_seed(0)
    assert torch.equal(xavier_uniform_whole(whole, tensor_parallel=4), expected)
