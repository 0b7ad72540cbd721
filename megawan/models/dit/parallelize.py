"""Parallelism and memory savings applied to the Wan DiT from outside (torchtitan's `parallelize` pattern): the
model files know nothing of pipeline stages, recompute or offload; the trainer calls these on what it built.

- `build_model_chunks`: this pipeline rank's chunks (megatron's interleaved assignment), with the
  pipeline-shared copies marked; `chunk_state_dict` cuts a full state dict down to one chunk.
- `apply_activation_recompute`: full (every N-th block keeps only its input) or selective (core attention).
- `apply_activation_offload`: the first N blocks' saved tensors go to pinned host memory.
- `apply_compile`: torch.compile each block (the repeated-block compile of torchtitan and diffusers).

Tensor and context parallelism need nothing here: the model takes its TP group and the CP groups that
`megawan.parallel.initialize` set up. Recompute, offload and compile wrap forwards in place, so parameter names
(and with them checkpoints and conversion) are unchanged.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn
from megatron.core import parallel_state
from torch.utils.checkpoint import checkpoint

from kernels.dispatch import compile_kwargs
from megawan.capabilities import cuda_available
from megawan.config import DiTConfig, ParallelConfig
from megawan.models.dit.model import WanDiT
from megawan.models.dit.seeding import new_init_seed
from megawan.models.state import model_device

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
RECOMPUTE_MODES = ("none", "full", "selective")
COMPILE_MODES = ("none", "blocks")


# ----------------------------------------------------------------------------------------------
# pipeline stages
#
# Each PP rank builds `virtual_pipeline` (or 1) chunks; chunk c of rank r holds the blocks of global chunk
# c * PP + r. The first chunk of the first rank embeds the patches, the last chunk of the last rank holds the
# head; every chunk embeds text and timestep itself, so only the video tokens travel between stages and the
# P2P tensor is megatron's usual [s, b, hidden]. Those embeddings' gradients are summed over chunks and
# stages by megawan.training.schedule.finalize_model_grads.


def build_model_chunks(config: DiTConfig, parallel: ParallelConfig, device=None) -> list:
    """This pipeline rank's model chunks (one without interleaving), built on `device` (default: this rank's,
    `megawan.capabilities.rank_device()`; on CUDA by megatron's GPU initialisation)."""
    device = model_device(device)
    pp = parallel.pipeline_parallel
    vp = parallel.virtual_pipeline or 1
    rank = parallel_state.get_pipeline_model_parallel_rank() if pp > 1 else 0
    per_chunk = config.num_layers // (pp * vp)
    seed = new_init_seed()  # one model: every chunk initialises its blocks and shared copies as one rank would
    chunks = []
    for c in range(vp):
        first = (c * pp + rank) * per_chunk
        chunk = WanDiT(config, layers=range(first, first + per_chunk),
                       pre_process=(rank == 0 and c == 0), post_process=(rank == pp - 1 and c == vp - 1),
                       pipeline_parallel=pp, virtual_pipeline=parallel.virtual_pipeline, device=device,
                       init_seed=seed)
        chunks.append(chunk)
    _mark_shared_copies(chunks)
    return chunks


def _mark_shared_copies(chunks: list) -> None:
    """Every chunk holds the pipeline-shared embeddings; all copies but the first stage's are marked `shared`,
    which megatron's gradient norm skips, so the summed gradient is counted once."""
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "pipeline_shared", False) and not chunk.pre_process:
                p.shared = True


def chunk_state_dict(state_dict: dict, chunk: WanDiT) -> dict:
    """The part of a full (megawan, this TP rank's) state dict that `chunk` holds, with local block numbers."""
    local = {g: i for i, g in enumerate(chunk.layers)}
    own = set(chunk.state_dict())
    out = {}
    for key, value in state_dict.items():
        m = _BLOCK.match(key)
        if m:
            if int(m.group(1)) in local:
                out[f"blocks.{local[int(m.group(1))]}.{m.group(2)}"] = value
        elif key in own:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# activation memory


def _dits(model: nn.Module) -> list:
    """The WanDiTs of a WanDiT or of a WanDiTExperts (A14B: both experts)."""
    return [model.high_noise, model.low_noise] if hasattr(model, "high_noise") else [model]


def _wrap_forward(module: nn.Module, wrapper) -> None:
    forward = module.forward
    module.forward = functools.wraps(forward)(wrapper(forward))


def _recomputed(forward):
    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return recomputed


def apply_activation_recompute(model: nn.Module, mode: str = "full", every: int = 1) -> nn.Module:
    """Recompute in the backward what the forward would save.

    full: every `every`-th block keeps only its input. selective: only the core attention of every block (its
    scores are the largest activation, and the cheapest to redo relative to their size).
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")
    if every < 1:
        raise ValueError(f"recompute every must be >= 1, got {every}")
    if mode == "none":
        return model
    for dit in _dits(model):
        for i, block in enumerate(dit.blocks):
            if mode == "full" and i % every == 0:
                _wrap_forward(block, _recomputed)
            elif mode == "selective":
                _wrap_forward(block.self_attention.core_attention, _recomputed)
                _wrap_forward(block.cross_attention.core_attention, _recomputed)
    return model


def _offloaded(forward):
    def offloaded(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=cuda_available()):
            return forward(*args, **kwargs)

    return offloaded


def apply_activation_offload(model: nn.Module, num_blocks: int) -> nn.Module:
    """Copy what the first `num_blocks` blocks of a chunk save for their backward to pinned host memory during
    the forward, and bring it back when the backward reaches them (megatron-core's `cpu_offloading_num_layers`,
    on torch's save_on_cpu).

    It trades PCIe time for GPU memory: a 14B-width block at 75,600 tokens saves up to ~28 GB (estimate; two
    such blocks peaked at 53 GB on an H100, docs/benchmarks.md), about a second over a 25 GB/s link each way,
    so it is meant for the few blocks that do not fit rather than for every block; tools/plan_parallel.py
    sizes it (the fewest blocks that make a layout fit). Combined with full recompute, an offloaded
    recomputed block sends only its input to the host.
    """
    if num_blocks < 0:
        raise ValueError(f"offload blocks must be >= 0, got {num_blocks}")
    for dit in _dits(model):
        for block in list(dit.blocks)[:num_blocks]:
            _wrap_forward(block, _offloaded)
    return model


# ----------------------------------------------------------------------------------------------
# compile


def apply_compile(model: nn.Module, mode: str = "blocks", backend: str = "inductor", fullgraph: bool = False
                  ) -> nn.Module:
    """torch.compile every block's forward on its own. Apply it before recompute and offload: their wrappers
    then run around the compiled forward (Dynamo cannot trace save_on_cpu).

    Every block runs the same code on same-shaped weights, so Dynamo traces one graph and every block reuses it
    (weights are graph inputs): one compile however deep the model. Inside a compiled block `kernels` hands
    everything to the compiler (kernels.dispatch.kernel_mode: "torch"), so Inductor fuses the modulated
    LayerNorms and gated adds with their neighbours, forward and backward. Inductor runs with
    `kernels.dispatch.inductor_options` (mix-order reduction off: it returned wrong-shaped, and wrong, modulation
    gradients). A new sequence length compiles once more, then the graph is shape-generic. The local backend's
    one-rank block is one graph (tests/test_compile.py: fullgraph=True); by default what Dynamo cannot trace
    (Transformer Engine modules, TP / CP collectives: not tried) runs eagerly between compiled pieces. Only
    forwards are wrapped (no `_orig_mod.` module): parameter names and checkpoints are unchanged.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
    if mode == "none":
        return model
    kwargs = compile_kwargs(backend, fullgraph)
    for dit in _dits(model):
        for block in dit.blocks:
            _wrap_forward(block, lambda forward: torch.compile(forward, **kwargs))
    return model
