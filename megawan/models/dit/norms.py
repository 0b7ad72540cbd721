"""Norms of the Wan block.

Wan normalises q and k with RMSNorm over the FULL hidden size (all heads together), not per head. Under
tensor parallelism each rank holds num_heads/TP heads, so the mean square is a sum across TP ranks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from megawan.parallel.groups import all_reduce_sum


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: Wan computes norms, modulation and RoPE in fp32 (fp64 models stay fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x.dtype))


class ParallelRMSNorm(nn.Module):
    """RMSNorm over a hidden dimension that is split across the TP group (weight split the same way)."""

    def __init__(self, hidden_size: int, eps: float, tp_group, params_dtype=torch.float32):
        super().__init__()
        tp = tp_group.size()
        if hidden_size % tp:
            raise ValueError(f"hidden size {hidden_size} is not divisible by tensor parallel size {tp}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.ones(hidden_size // tp, dtype=params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        sum_sq = all_reduce_sum(xf.pow(2).sum(dim=-1, keepdim=True), self.tp_group)
        normed = xf * torch.rsqrt(sum_sq / self.hidden_size + self.eps)
        return normed.type_as(x) * self.weight

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"],
        )


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in (at least) fp32, result in fp32 (Wan modulates in fp32 before casting back)."""
    return F.layer_norm(
        upcast(x), (x.shape[-1],),
        None if weight is None else upcast(weight), None if bias is None else upcast(bias), eps,
    )


class FP32LayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in fp32, cast back to the input dtype (Wan's cross-attention norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_fp32(x, self.eps, self.weight, self.bias).type_as(x)
