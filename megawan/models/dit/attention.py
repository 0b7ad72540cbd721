"""Self- and cross-attention of the Wan block, on megatron-core parallel linears.

Inside the model tensors are sequence-first, [s, b, hidden]. Each TP rank holds num_heads / TP heads:
q, k, v are column-parallel, the output projection row-parallel, and the q/k RMSNorm is over the full
hidden size (statistics summed across the TP group).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

import kernels
from megawan.models.dit.norms import ParallelRMSNorm
from megawan.models.dit.rope import apply_rope


@dataclass
class WanAttentionSubmodules:
    linear_q: Union[ModuleSpec, type] = None
    linear_k: Union[ModuleSpec, type] = None
    linear_v: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_norm: Union[ModuleSpec, type] = None
    k_norm: Union[ModuleSpec, type] = None


def without_context_parallel(config):
    """The TransformerConfig of an attention whose sequence is not split over CP ranks."""
    if config.context_parallel_size == 1:
        return config
    return dataclasses.replace(config, context_parallel_size=1, cp_comm_type=None,
                               hierarchical_context_parallel_sizes=None)


class _WanAttentionBase(MegatronModule):
    def __init__(self, config, submodules: WanAttentionSubmodules, layer_number: int, tp_group,
                 attention_type: str, kv_input_size: int, qk_norm: bool, eps: float):
        super().__init__(config=config)
        # Keys and values of the cross-attention come from text / image tokens, which are never split along
        # the sequence: their projections run without sequence parallelism.
        self.kv_config = config if attention_type == "self" else dataclasses.replace(config, sequence_parallel=False)
        hidden = config.hidden_size
        self.tp_group = tp_group
        self.num_heads_local = config.num_attention_heads // tp_group.size()
        self.head_dim = hidden // config.num_attention_heads

        self.linear_q = self._column(submodules.linear_q, hidden, "q")
        self.linear_k = self._column(submodules.linear_k, kv_input_size, "k", self.kv_config)
        self.linear_v = self._column(submodules.linear_v, kv_input_size, "v", self.kv_config)
        # The self-attention's sequence is split over the CP ranks (TE's CP from config.context_parallel_size and
        # cp_comm_type); the cross-attention's keys, the text, are whole on every rank: its config has no CP.
        core_config = config if attention_type == "self" else without_context_parallel(config)
        self.core_attention = build_module(
            submodules.core_attention, config=core_config, layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask, attention_type=attention_type, cp_comm_type=core_config.cp_comm_type,
        )
        self.linear_proj = build_module(
            submodules.linear_proj, hidden, hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="proj",
            tp_group=tp_group,
        )
        self.q_norm = self._norm(submodules.q_norm, qk_norm, eps)
        self.k_norm = self._norm(submodules.k_norm, qk_norm, eps)

    def _column(self, spec, in_size: int, name: str, config=None):
        """A column-parallel projection to the (split) hidden size: each rank gets its own heads."""
        config = config or self.config
        return build_module(spec, in_size, config.hidden_size, config=config,
                            init_method=config.init_method, gather_output=False, bias=True,
                            skip_bias_add=False, is_expert=False, tp_comm_buffer_name=name, tp_group=self.tp_group)

    def _norm(self, spec, enabled: bool, eps: float):
        if not enabled:
            return torch.nn.Identity()
        return build_module(spec, self.config.hidden_size, eps=eps, tp_group=self.tp_group,
                            params_dtype=self.config.params_dtype)

    def _attend(self, q, k, v, attention_mask: Optional[torch.Tensor] = None):
        """[s, b, heads, d] each -> [sq, b, heads * d]; bidirectional. attention_mask: bool [b, 1, 1, sk], True at
        the padding of a padded sequence (TE's padding mask)."""
        mask_type = AttnMaskType.no_mask if attention_mask is None else AttnMaskType.padding
        return self.core_attention(q, k, v, attention_mask, attn_mask_type=mask_type)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads_local, self.head_dim))


class WanSelfAttention(_WanAttentionBase):
    """Self-attention over video tokens with q/k RMSNorm and 3D RoPE."""

    def _fused_norm_rope(self, x) -> bool:
        """The fused kernel normalises over the hidden it sees: only right when this rank holds all heads."""
        return (self.tp_group.size() == 1 and isinstance(self.q_norm, ParallelRMSNorm)
                and kernels.fused_path(x))

    def __init__(self, config, submodules: WanAttentionSubmodules, layer_number: int, tp_group,
                 qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(config, submodules, layer_number, tp_group, "self", config.hidden_size, qk_norm, eps)

    def forward(self, x: torch.Tensor, rope_cos_sin, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        cos, sin = rope_cos_sin
        if self._fused_norm_rope(x):
            # one Triton pass: RMSNorm over the hidden (all heads on this rank, TP = 1) then the 3D RoPE
            cos2, sin2 = cos[:, 0, 0], sin[:, 0, 0]
            q = kernels.qk_norm_rope(self.linear_q(x)[0], self.q_norm.weight, cos2, sin2, self.num_heads_local,
                                     self.q_norm.eps)
            k = kernels.qk_norm_rope(self.linear_k(x)[0], self.k_norm.weight, cos2, sin2, self.num_heads_local,
                                     self.k_norm.eps)
        else:
            q = apply_rope(self._heads(self.q_norm(self.linear_q(x)[0])), cos, sin)
            k = apply_rope(self._heads(self.k_norm(self.linear_k(x)[0])), cos, sin)
        v = self.linear_v(x)[0]
        out = self._attend(q, k, self._heads(v), attention_mask)
        return self.linear_proj(out)[0]


@dataclass
class WanCrossAttentionSubmodules(WanAttentionSubmodules):
    linear_k_img: Union[ModuleSpec, type] = None
    linear_v_img: Union[ModuleSpec, type] = None
    k_img_norm: Union[ModuleSpec, type] = None


class WanCrossAttention(_WanAttentionBase):
    """Cross-attention from video tokens to the text tokens (and, Wan2.1 I2V, to CLIP image tokens with
    their own key / value projections; the two attentions are summed before the output projection)."""

    def __init__(self, config, submodules: WanCrossAttentionSubmodules, layer_number: int, tp_group,
                 qk_norm: bool = True, eps: float = 1e-6, image_branch: bool = False):
        super().__init__(config, submodules, layer_number, tp_group, "cross", config.hidden_size, qk_norm, eps)
        self.image_branch = image_branch
        if image_branch:
            self.linear_k_img = self._column(submodules.linear_k_img, config.hidden_size, "k_img", self.kv_config)
            self.linear_v_img = self._column(submodules.linear_v_img, config.hidden_size, "v_img", self.kv_config)
            self.k_img_norm = self._norm(submodules.k_img_norm, qk_norm, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_context: Optional[torch.Tensor] = None):
        q = self._heads(self.q_norm(self.linear_q(x)[0]))
        k = self._heads(self.k_norm(self.linear_k(context)[0]))
        v = self._heads(self.linear_v(context)[0])
        out = self._attend(q, k, v)
        if self.image_branch:
            if image_context is None:
                raise ValueError("this model has an image branch (Wan2.1 I2V): pass the CLIP image tokens")
            k_img = self._heads(self.k_img_norm(self.linear_k_img(image_context)[0]))
            v_img = self._heads(self.linear_v_img(image_context)[0])
            out = out + self._attend(q, k_img, v_img)
        return self.linear_proj(out)[0]
