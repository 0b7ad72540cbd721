"""flops() equals the multiply-adds torch counts in an actual forward pass of the model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megawan.config import dit_preset
from megawan.models.dit import WanDiT, flops
from megawan.models.dit.flops import tokens
from wan_reference import random_inputs


@pytest.mark.parametrize("preset,per_token,image_tokens", [("tiny", False, 0), ("tiny-i2v", False, 7), ("tiny-ti2v", True, 0)])
def test_flops_match_counted_forward(preset, per_token, image_tokens):
    cfg = dit_preset(preset)
    model = WanDiT(cfg).eval()
    batch, frames, height, width = 2, 3, 4, 6
    inputs = random_inputs(cfg, batch=batch, frames=frames, height=height, width=width, per_token=per_token,
                           image_tokens=image_tokens or 7)
    # the math SDPA backend runs attention as matmuls, which the counter sees
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs[:3], image=inputs[3])
    expected = flops(cfg, batch, frames, height, width, image_len=image_tokens, per_token_timestep=per_token)
    assert counter.get_total_flops() == expected


def test_flops_of_the_14b_model_at_720p():
    """Order-of-magnitude sanity: 14B params, 75,600 tokens -> about 2 * N * s plus attention."""
    cfg = dit_preset("wan2.1-t2v-14b")
    assert tokens(cfg, 21, 90, 160) == 75_600
    total = flops(cfg, 1, 21, 90, 160)
    dense = 2 * 14.0e9 * 75_600
    attention = cfg.num_layers * 4 * 75_600**2 * cfg.dim
    assert 0.9 < total / (dense + attention) < 1.1
