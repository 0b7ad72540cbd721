"""The DiT under context and sequence parallelism (alone and with TP) computes diffusers' output (fp32,
<= 1e-5) and the single-rank gradients (float64), including token counts that CP x SP does not divide.
Gradients are reassembled as the trainer's reductions would (parallel_harness.check_layout)."""

import pytest

from megawan.capabilities import cuda_available
from megawan.config import dit_preset
from megawan.models.dit import WanDiT
from megawan.parallel.launch import spawn_local
from parallel_harness import build_cases, check_layout, run_layout

LAYOUTS = {
    # id: (world, parallel layout, latent size (frames, height, width) -> tokens)
    "cp2-ulysses": (2, dict(context_parallel=2), dict(frames=3, height=4, width=6)),  # 18 tokens
    "cp2-ring-padded": (2, dict(context_parallel=2, context_parallel_mode="ring"), dict(frames=3, height=6, width=6)),  # 27
    "tp2-cp2-ulysses": (4, dict(tensor_parallel=2, context_parallel=2), dict(frames=3, height=4, width=6)),
    "cp4-2d-padded": (4, dict(context_parallel=4, context_parallel_mode="2d", ulysses_size=2), dict(frames=3, height=4, width=6)),
    "tp2-sp-padded": (2, dict(tensor_parallel=2, sequence_parallel=True), dict(frames=3, height=6, width=6)),  # 27
    "tp2-sp-cp2-ring": (4, dict(tensor_parallel=2, sequence_parallel=True, context_parallel=2,
                                context_parallel_mode="ring"), dict(frames=3, height=4, width=6)),  # 18 -> 20
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_matches_diffusers_and_single_rank(layout, tmp_path):
    world, parallel, input_args = LAYOUTS[layout]
    cases, refs = build_cases({
        "t2v": (dict(preset="tiny", num_heads=4), input_args),
        "ti2v": (dict(preset="tiny-ti2v", num_heads=4), dict(input_args, per_token=True)),
    })
    ranks = run_layout(cases, tmp_path, world, **parallel)
    check_layout(ranks, refs, parallel.get("tensor_parallel", 1), label=layout)


def _sequence_parallel_worker(rank):
    from wan_reference import random_inputs

    cfg = dit_preset("tiny", num_heads=4)
    with pytest.raises(RuntimeError, match="megatron_cpu_mode"):
        WanDiT(cfg)(*random_inputs(cfg)[:3])


@pytest.mark.skipif(cuda_available(), reason="checks the CPU message")
def test_sequence_parallel_on_cpu_outside_cpu_mode_says_what_to_do():
    """megatron-core's sequence-parallel collectives allocate CUDA buffers; on CPU they run inside
    megatron_cpu_mode(), and outside it the model says so instead of failing deep in megatron."""
    spawn_local(_sequence_parallel_worker, world_size=2, tensor_parallel=2, sequence_parallel=True)
