"""Initialisation that does not depend on how the model is split.

WanDiT builds each component (patch / text / time / image embedding, block i, head) under
`component_rng(seed)`, its seed derived from one model-wide seed and the component's global name. Drawing every
component from one running generator instead would make a block's weights depend on what was built before it
on the same rank: a pipeline stage holding blocks 2-3 would initialise them as one rank initialises blocks 0-1,
and each stage's copy of the pipeline-shared embeddings would differ from the others.
"""

from __future__ import annotations

import contextlib

import torch


def new_init_seed() -> int:
    """A model-wide initialisation seed from torch's global generator (seeded alike on every rank by
    megawan.parallel.initialize, so every rank draws the same one)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


@contextlib.contextmanager
def component_rng(seed: int, device: torch.device, tp_rank: int = 0):
    """Run the block with torch's generators seeded by `seed`, and give the caller's states back afterwards.

    On CUDA megatron initialises tensor-parallel shards from its CUDA RNG tracker (one stream per TP rank,
    which megawan.parallel.initialize seeds), so the tracker is re-seeded from `seed` as megatron seeds it
    (model_parallel_cuda_manual_seed) and restored afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()]
                               if cuda else []):
        torch.manual_seed(seed)
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker() if cuda else None
        if tracker is None or not tracker.is_initialized():
            yield
            return
        saved = tracker.get_states()
        tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        try:
            yield
        finally:
            tracker.set_states(saved)
