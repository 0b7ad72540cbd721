"""Core attention of the `local` backend: softmax(q k^T / sqrt(d)) v with torch SDPA.

Same constructor and call signature as megatron-core's DotProductAttention / TEDotProductAttention, so a
layer spec swaps one for the other. (megatron's own DotProductAttention asks CUDA for a buffer and cannot
run on CPU.)
"""

from __future__ import annotations

from typing import Optional

import torch
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
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise ValueError(f"Wan attention is bidirectional; mask type {attn_mask_type} is not supported")
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        # self-attention over video tokens is split across context-parallel ranks; cross-attention is not
        # (every CP rank holds the full text)
        self.cp = context_parallel_groups() if attention_type == "self" else None
        self.self_attention = attention_type == "self"

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, valid_tokens=None):
        """query [sq, b, heads, d], key / value [sk, b, heads, d] -> [sq, b, heads * d].

        attention_mask (optional): bool [b, 1, sq or 1, sk], True where attention is NOT allowed (megatron's
        convention). Under context parallelism q, k, v are this rank's chunk of the sequence and
        valid_tokens says how many leading tokens of the padded global sequence are real.
        """
        if self.cp is not None:
            if attention_mask is not None:
                raise ValueError("context-parallel attention takes valid_tokens, not a mask")
            # (self.cp is set for self-attention only; context_parallel_attention decides where FP8 applies)
            return context_parallel_attention(query, key, value, self.cp, valid_tokens, self.softmax_scale,
                                              fp8=fp8_attention_enabled())
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask = None if attention_mask is None else ~attention_mask
        if valid_tokens is not None and valid_tokens < k.shape[-2]:  # a padded sequence (sequence parallel)
            keep = (torch.arange(k.shape[-2], device=k.device) < valid_tokens).view(1, 1, 1, -1)
            mask = keep if mask is None else mask & keep
        if self.self_attention and mask is None and fp8_attention_enabled():
            # train.fp8_attention on the local backend: both products in FP8 (the cross-attention to 512 text
            # tokens, a small share of the FLOPs, stays bf16, as do padded sequences; under context parallelism
            # context_parallel_attention decides: Ulysses runs the FP8 kernel, ring does not)
            out = fp8_attention(q, k, v, self.softmax_scale)
        else:
            # (torch picks the kernel: on an H100 with torch 2.11 cuDNN's, 1.65x its flash kernel at 32k tokens)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale
            )
        return out.permute(2, 0, 1, 3).flatten(2)
