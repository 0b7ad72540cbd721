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

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, heads, d], key / value [sk, b, heads, d] -> [sq, b, heads * d].

        attention_mask (optional): bool [b, 1, sq or 1, sk], True where attention is NOT allowed (megatron's
        convention).
        """
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale
        )
        return out.permute(2, 0, 1, 3).flatten(2)
