"""Tensor parallelism on CPU over gloo: TP=2 and TP=4 compute diffusers' output (fp32, <= 1e-5) and the
single-rank gradients (gathered; float64, see parallel_harness.py). Each TP size is one spawn of N
processes running every variant, to keep the suite fast on 2 cores."""

import pytest

from parallel_harness import build_cases, check_layout, run_layout

# 4 heads so that TP=4 divides them; non-square latents, odd frame count, batch 2.
VARIANTS = {
    "t2v": (dict(preset="tiny", num_heads=4), dict(frames=3, height=4, width=6)),
    "i2v": (dict(preset="tiny-i2v", num_heads=4, text_len=512), dict(frames=3, height=4, width=6)),
    "ti2v": (dict(preset="tiny-ti2v", num_heads=4), dict(frames=3, height=4, width=6, per_token=True)),
}


@pytest.fixture(scope="module")
def cases():
    return build_cases(VARIANTS)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_diffusers_and_single_rank(cases, tmp_path, tp):
    case_dict, refs = cases
    ranks = run_layout(case_dict, tmp_path, world=tp, tensor_parallel=tp)
    check_layout(ranks, refs, tp, label=f"TP={tp}")
