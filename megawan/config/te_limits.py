"""What Transformer Engine can take under megawan's layouts: pure rules (numbers in, a reason out) shared by the
config checks and preflight (refuse before any rank starts) and by the model (refuse at the first forward).

Read from TE 2.9-2.11 (the range megatron-core 0.16.1 supports), pytorch/attention/dot_product_attention/:

- context_parallel.py: TE's context parallelism in the sbhd layout knows no padding mask (`not padding or
  qkv_format == "thd"`), so every CP rank's chunk must be real tokens: the video token count must divide by the
  split megawan makes, CP x (TP under sequence parallelism). p2p, a2a and a2a+p2p all cut a rank's chunk in two
  halves ("Sequence length per GPU needs to be divisible by 2"): the count must also divide by 2 x CP. a2a
  scatters heads ("number of attention heads needs to be divisible by CP size") and wants a head dim that is a
  multiple of 8.
- utils.get_attention_backend: with CP in sbhd only cuDNN's fused attention runs, bidirectional masks
  (no_mask) only; its load-balancing reorder (DualChunkSwap) is a permutation that bidirectional attention does
  not see, so megawan's contiguous split (rank order = sequence order) gives the right result.
- Without CP a padded sequence (sequence parallelism pads to a multiple of TP) goes through TE's padding mask.
- pytorch/utils.assert_dim_for_fp8_exec: an FP8 linear's input rows must divide by 8, its widths by 16.
"""

from __future__ import annotations

import math
from typing import Optional

# parallel.context_parallel_mode -> TE's cp_comm_type (megatron's TransformerConfig.cp_comm_type)
CP_COMM_TYPES = {"ulysses": "a2a", "ring": "p2p", "2d": "a2a+p2p"}


def sequence_split(parallel) -> int:
    """How many ranks split the video tokens: CP x (TP under sequence parallelism); the sequence is padded to a
    multiple of this (megawan.models.dit.model)."""
    sp = parallel.tensor_parallel if parallel.sequence_parallel else 1
    return parallel.context_parallel * sp


def te_token_multiple(parallel) -> int:
    """The multiple a video token count must be for TE under this layout (1: any count, padding is masked)."""
    cp = parallel.context_parallel
    return 1 if cp == 1 else math.lcm(2 * cp, sequence_split(parallel))


def te_layout_problem(head_dim: int, parallel) -> Optional[str]:
    """Why TE's context-parallel attention cannot run this layout at all (None: it can). (Heads that the
    all-to-all cannot scatter are refused for every backend, by RunConfig.validate.)"""
    if parallel.context_parallel > 1 and head_dim % 8:
        return (f"model.num_heads: TE's context-parallel attention (cuDNN fused attention) needs a head dim that is "
                f"a multiple of 8, got {head_dim}")
    return None


def te_tokens_problem(tokens: int, parallel) -> Optional[str]:
    """Why TE cannot attend over `tokens` video tokens under this layout (None: it can)."""
    multiple = te_token_multiple(parallel)
    if tokens % multiple == 0:
        return None
    return (f"{tokens} video tokens are not a multiple of {multiple}: TE's context parallelism "
            f"({CP_COMM_TYPES[parallel.context_parallel_mode]}, CP={parallel.context_parallel}"
            f"{', sequence parallel TP=' + str(parallel.tensor_parallel) if parallel.sequence_parallel else ''}) "
            f"cannot mask the padding that would take")


def te_fp8_problem(dim: int, ffn_dim: int, text_len: int, tokens: int, micro_batch: int, parallel) -> Optional[str]:
    """Why TE's FP8 linears cannot take these shapes (None: they can): rows of every linear's input a multiple of
    8 (this rank's video tokens x micro batch, text tokens x micro batch), widths of 16."""
    tp = parallel.tensor_parallel
    for name, width in (("model.dim", dim), ("model.dim / TP", dim // tp), ("model.ffn_dim / TP", ffn_dim // tp)):
        if width % 16:
            return f"{name} = {width} is not a multiple of 16, which TE's FP8 linears need"
    split = sequence_split(parallel)
    local = -(-tokens // split) * micro_batch  # this rank's padded tokens, as the model splits them
    if local % 8:
        return (f"{tokens} video tokens give {local} rows per rank (micro batch {micro_batch}, split over {split}), "
                "not a multiple of 8, which TE's FP8 linears need")
    if (text_len * micro_batch) % 8:
        return f"model.text_len x micro batch = {text_len * micro_batch} is not a multiple of 8 (TE's FP8 linears)"
    return None
