"""Core attention of the `local` backend: softmax(q k^T / sqrt(d)) v with torch SDPA.

The interface of megatron-core's TEDotProductAttention, so a layer spec swaps one for the other (tests/
test_te_contract.py holds the calls to TE's signatures): padding comes as `attention_mask` (bool
[b, 1, 1, sk], True = masked out) with attn_mask_type=padding, and context parallelism is on when
config.context_parallel_size > 1, as TE decides. (megatron's own DotProductAttention asks CUDA for a buffer and
cannot run on CPU.)
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from kernels import fp8_attention
from megawan.models.dit.fp8_linear import fp8_attention_enabled
from megawan.parallel.context_parallel import context_parallel_attention
from megawan.parallel.groups import context_parallel_groups


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.no_mask,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        num_splits: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise ValueError(f"Wan attention is bidirectional; mask type {attn_mask_type} is not supported")
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.self_attention = attention_type == "self"
        # The config says whether this attention's sequence is split over CP ranks, as TE reads it: the model
        # gives the self-attention its CP config and the cross-attention (to the text every rank holds) none.
        # Which exchange (ulysses / ring / 2d) is the CP groups' mode, what cp_comm_type names for TE.
        self.cp = None
        if config.context_parallel_size > 1:
            self.cp = context_parallel_groups()
            if self.cp is None or self.cp.size != config.context_parallel_size:
                raise RuntimeError(f"config.context_parallel_size={config.context_parallel_size} but the context-"
                                   "parallel groups are not set up for it (megawan.parallel.initialize)")

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=AttnMaskType.no_mask,
                attention_bias=None, packed_seq_params=None, num_splits=None):
        """query [sq, b, heads, d], key / value [sk, b, heads, d] -> [sq, b, heads * d].

        attention_mask: with attn_mask_type=padding, bool [b, 1, 1, sk] True at padded keys (TE's and megatron's
        convention); None with no_mask. Under context parallelism q, k, v are this rank's chunk of the sequence
        and the mask spans the whole padded sequence, its padding at the end (as the model pads).
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("Wan attention takes no attention bias or packed sequences")
        if (attn_mask_type == AttnMaskType.padding) != (attention_mask is not None):
            # TE would ignore a mask given with no_mask: refuse the combination instead of guessing
            raise ValueError(f"attn_mask_type={attn_mask_type.name} with attention_mask="
                             f"{None if attention_mask is None else tuple(attention_mask.shape)}")
        if self.cp is not None:
            real = None
            if attention_mask is not None:  # how many leading tokens of the padded sequence are real
                real = attention_mask.shape[-1] - int(attention_mask[0].sum())
            # (self.cp is set for self-attention only; context_parallel_attention decides where FP8 applies)
            return context_parallel_attention(query, key, value, self.cp, real, self.softmax_scale,
                                              fp8=fp8_attention_enabled())
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        keep = None if attention_mask is None else ~attention_mask  # SDPA's bool mask: True = attend
        if self.self_attention and keep is None and fp8_attention_enabled():
            # train.fp8_attention on the local backend: both products in FP8 (the cross-attention to 512 text
            # tokens, a small share of the FLOPs, stays bf16, as do padded sequences; under context parallelism
            # context_parallel_attention decides: Ulysses runs the FP8 kernel, ring does not)
            out = fp8_attention(q, k, v, self.softmax_scale)
        else:
            # (torch picks the kernel: on an H100 with torch 2.11 cuDNN's, 1.65x its flash kernel at 32k tokens)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale
            )
        return out.permute(2, 0, 1, 3).flatten(2)
