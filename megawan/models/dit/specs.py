"""Layer specs of the Wan block: one block definition, two backends.

`local`: megatron-core's ColumnParallelLinear / RowParallelLinear and torch SDPA core attention; runs on
CPU (gloo) and GPU. `te`: Transformer Engine linears and fused attention (flash / cuDNN, FP8-capable);
GPU only. The q/k RMSNorm is ours in both: Wan normalises over the full hidden size, which needs a
reduction across TP ranks that no library norm does.
"""

from __future__ import annotations

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megawan.models.dit.attention import (
    WanCrossAttention,
    WanCrossAttentionSubmodules,
    WanSelfAttention,
    WanAttentionSubmodules,
)
from megawan.models.dit.block import WanBlock, WanBlockSubmodules
from megawan.models.dit.core_attention import SDPACoreAttention
from megawan.models.dit.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from megawan.models.dit.norms import ParallelRMSNorm

_TE = "megatron.core.extensions.transformer_engine"


def wan_block_spec(column, row, core_attention) -> ModuleSpec:
    """The block with these column- / row-parallel linear and core-attention classes (or specs)."""
    return ModuleSpec(
        module=WanBlock,
        submodules=WanBlockSubmodules(
            self_attention=ModuleSpec(
                module=WanSelfAttention,
                submodules=WanAttentionSubmodules(
                    linear_q=column, linear_k=column, linear_v=column, core_attention=core_attention,
                    linear_proj=row, q_norm=ParallelRMSNorm, k_norm=ParallelRMSNorm,
                ),
            ),
            cross_attention=ModuleSpec(
                module=WanCrossAttention,
                submodules=WanCrossAttentionSubmodules(
                    linear_q=column, linear_k=column, linear_v=column, core_attention=core_attention,
                    linear_proj=row, q_norm=ParallelRMSNorm, k_norm=ParallelRMSNorm,
                    linear_k_img=column, linear_v_img=column, k_img_norm=ParallelRMSNorm,
                ),
            ),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def get_wan_block_local_spec() -> ModuleSpec:
    """megatron-core's parallel linears (with an FP8 product on plain torch inside `local_fp8()`) and SDPA."""
    return wan_block_spec(Fp8ColumnParallelLinear, Fp8RowParallelLinear, SDPACoreAttention)


def get_wan_block_te_spec() -> ModuleSpec:
    """Transformer Engine spec; the classes are imported when the block is built (TE must be installed)."""
    return wan_block_spec(
        ModuleSpec(module=(_TE, "TEColumnParallelLinear")),
        ModuleSpec(module=(_TE, "TERowParallelLinear")),
        ModuleSpec(module=(_TE, "TEDotProductAttention")),
    )


def get_wan_block_spec(backend: str) -> ModuleSpec:
    return {"local": get_wan_block_local_spec, "te": get_wan_block_te_spec}[backend]()
