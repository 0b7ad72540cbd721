"""One Wan DiT block: self-attention, cross-attention, MLP, modulated by the timestep.

    x = x + gate   * SelfAttn( LN(x) * (1 + scale)   + shift,   RoPE )
    x = x +          CrossAttn( LN_affine(x), text [, image] )
    x = x + c_gate * MLP(      LN(x) * (1 + c_scale) + c_shift )

(shift, scale, gate, c_shift, c_scale, c_gate) = modulation + e0, the block's learned table plus the
time projection; per token for Wan2.2 TI2V. Modulation and LayerNorm run in fp32 as in Wan. On GPU the
modulated LayerNorm and the gated residual adds are fused Triton kernels (`kernels`, same arithmetic);
elsewhere the torch expressions below run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

import kernels
from kernels.dispatch import fused_path
from megawan.models.dit.norms import FP32LayerNorm, layer_norm_fp32, upcast


@dataclass
class WanBlockSubmodules:
    self_attention: Union[ModuleSpec, type] = None
    cross_attention: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class WanBlock(MegatronModule):
    def __init__(self, config, submodules: WanBlockSubmodules, layer_number: int, tp_group, dit_config):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.eps = dit_config.eps
        dim = config.hidden_size
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number, tp_group=tp_group,
            qk_norm=dit_config.qk_norm, eps=dit_config.eps,
        )
        self.cross_attention_norm = (
            FP32LayerNorm(dim, eps=dit_config.eps, dtype=config.params_dtype) if dit_config.cross_attn_norm else nn.Identity()
        )
        self.cross_attention = build_module(
            submodules.cross_attention, config=config, layer_number=layer_number, tp_group=tp_group,
            qk_norm=dit_config.qk_norm, eps=dit_config.eps, image_branch=dit_config.image_dim is not None,
        )
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim, dtype=config.params_dtype) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope_cos_sin,
                image_context: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """x [s, b, dim]; e0 [1 or s, b, 6, dim] fp32; context [s_txt, b, dim]; image_context [s_img, b, dim];
        attention_mask: bool [b, 1, 1, S], True at the padding of a padded video sequence (S: its whole length)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (upcast(self.modulation) + e0).unbind(dim=-2)

        fused = fused_path(x)
        y = self._modulate(x, scale, shift, fused)
        x = self._gated_add(x, self.self_attention(y, rope_cos_sin, attention_mask), gate, fused)

        x = x + self.cross_attention(self.cross_attention_norm(x), context, image_context)

        y = self._modulate(x, c_scale, c_shift, fused)
        out, out_bias = self.mlp(y)
        if out_bias is not None:
            out = out + out_bias
        return self._gated_add(x, out, c_gate, fused)

    def _modulate(self, x, scale, shift, fused: bool):
        if fused:
            return kernels.modulate(x, scale, shift, self.eps)
        return (layer_norm_fp32(x, self.eps) * (1 + scale) + shift).type_as(x)

    @staticmethod
    def _gated_add(x, y, gate, fused: bool):
        if fused:
            return kernels.gated_residual(x, y, gate)
        return (upcast(x) + upcast(y) * gate).type_as(x)
