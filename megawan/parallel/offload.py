"""Activation offload, applied to a built model from outside: the tensors that the first `num_blocks` blocks of
each model chunk save for their backward are copied to pinned host memory during the forward and brought
back when the backward reaches them (megatron-core's `cpu_offloading_num_layers`, on torch's save_on_cpu).

It trades PCIe time for GPU memory: a 14B-width block at 75,600 tokens saves up to ~28 GB (estimate; two such
blocks peaked at 53 GB on an H100, docs/benchmarks.md), about a second over a 25 GB/s link each way, so it is meant for the few blocks that do not fit
rather than for every block; tools/plan_parallel.py sizes it (the fewest blocks that make a layout fit).
Combined with full recompute, an offloaded recomputed block sends only its input to the host.
Parameter names are unchanged (forwards are wrapped in place).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn


def _offload_forward(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def offloaded(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    module.forward = offloaded


def apply_activation_offload(model: nn.Module, num_blocks: int) -> nn.Module:
    """Offload the saved activations of the first num_blocks blocks of a WanDiT / WanDiTExperts chunk."""
    if num_blocks < 0:
        raise ValueError(f"offload blocks must be >= 0, got {num_blocks}")
    dits = [model.high_noise, model.low_noise] if hasattr(model, "high_noise") else [model]
    for dit in dits:
        for block in list(dit.blocks)[:num_blocks]:
            _offload_forward(block)
    return model
