"""The umT5 encoder Wan conditions on (umT5-XXL: 24 layers, 4096 wide, 64 heads, 512 tokens).

T5's RMS LayerNorm (no mean, no bias, statistics in fp32), unscaled dot-product attention plus a learned
relative-position bias in EVERY layer (umT5; T5 shares layer 0's), gated-GELU(tanh) feed-forward, no biases.
Batch-first [b, s, d]. Tensor parallel over megatron-core layers: vocabulary-parallel embedding, heads split
over TP ranks (each rank keeps its heads' relative-bias columns), column / row-parallel projections.

    enc = UMT5Encoder(text_preset("umt5-xxl"))
    states = enc(ids, mask)        # [B, L, 4096]; padded positions are zero, as Wan feeds the DiT
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megawan.config import TextConfig
from megawan.models.state import model_device, torch_dtype, with_extra_state
from megawan.parallel.groups import tensor_parallel_group



def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets of (key position - query position): half the buckets per sign; exact up to
    num_buckets/4, logarithmic up to max_distance, the last bucket beyond."""
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    distance = relative.abs()
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head); this TP rank holds its heads' columns."""

    def __init__(self, num_buckets: int, num_heads_local: int, max_distance: int, dtype):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads_local, dtype=dtype)
        set_tensor_model_parallel_attributes(self.embedding.weight, is_parallel=True, dim=1, stride=1)

    def forward(self, length: int) -> torch.Tensor:
        position = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(position[None, :] - position[:, None], self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, q, k]


def _linear(kind, in_size, out_size, config, tp_group):
    common = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False, tp_group=tp_group)
    if kind == "column":
        return ColumnParallelLinear(in_size, out_size, gather_output=False, **common)
    return RowParallelLinear(in_size, out_size, input_is_parallel=True, **common)


class UMT5Attention(nn.Module):
    def __init__(self, cfg: TextConfig, config: TransformerConfig, tp_group):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads_local, self.d_kv = cfg.num_heads // tp_group.size(), cfg.d_kv
        self.q = _linear("column", cfg.d_model, inner, config, tp_group)
        self.k = _linear("column", cfg.d_model, inner, config, tp_group)
        self.v = _linear("column", cfg.d_model, inner, config, tp_group)
        self.o = _linear("row", inner, cfg.d_model, config, tp_group)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [b, s, d]; bias [b or 1, heads, s, s]: relative positions plus the padding mask."""
        b, s, _ = x.shape
        q, k, v = (proj(x)[0].view(b, s, self.heads_local, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))[0]


class UMT5FeedForward(nn.Module):
    """fc2( gelu_tanh(gate(x)) * fc1(x) )."""

    def __init__(self, cfg: TextConfig, config: TransformerConfig, tp_group):
        super().__init__()
        self.gate = _linear("column", cfg.d_model, cfg.d_ff, config, tp_group)
        self.fc1 = _linear("column", cfg.d_model, cfg.d_ff, config, tp_group)
        self.fc2 = _linear("row", cfg.d_ff, cfg.d_model, config, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.gate(x)[0], approximate="tanh") * self.fc1(x)[0])[0]


class UMT5Block(nn.Module):
    def __init__(self, cfg: TextConfig, config: TransformerConfig, tp_group):
        super().__init__()
        dtype = config.params_dtype
        self.norm1 = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.attn = UMT5Attention(cfg, config, tp_group)
        self.norm2 = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.ffn = UMT5FeedForward(cfg, config, tp_group)
        self.pos_embedding = RelativePositionBias(cfg.relative_attention_num_buckets, cfg.num_heads // tp_group.size(),
                                                  cfg.relative_attention_max_distance, dtype)

    def forward(self, x: torch.Tensor, padding_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.pos_embedding(x.shape[1]) + padding_bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(MegatronModule):
    def __init__(self, config: TextConfig, tp_group=None, device="cpu"):
        tp_group = tp_group if tp_group is not None else tensor_parallel_group()
        config.validate(tensor_parallel=tp_group.size())
        device = model_device(device)
        megatron = TransformerConfig(
            num_layers=config.num_layers, hidden_size=config.d_model, num_attention_heads=config.num_heads,
            ffn_hidden_size=config.d_ff, kv_channels=config.d_kv, tensor_model_parallel_size=tp_group.size(),
            add_bias_linear=False, params_dtype=torch_dtype(config.params_dtype),
            use_cpu_initialization=device.type != "cuda",  # on CUDA megatron creates each shard on the device
            gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
            init_method=nn.init.xavier_uniform_, output_layer_init_method=nn.init.xavier_uniform_,
        )
        super().__init__(config=megatron)
        self.text_config = config
        self.tp_group = tp_group
        with torch.device(device):  # every parameter is created where the encoder runs
            self.token_embedding = VocabParallelEmbedding(config.vocab_size, config.d_model,
                                                          init_method=nn.init.normal_, config=megatron,
                                                          tp_group=tp_group)
            self.blocks = nn.ModuleList(UMT5Block(config, megatron, tp_group) for _ in range(config.num_layers))
            self.norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, megatron.params_dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (long), mask [B, L] (1 = token, 0 = padding) -> states [B, L, d_model], zero at padding."""
        x = self.token_embedding(ids)
        dtype = x.dtype
        padding_bias = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(dtype).min
        for block in self.blocks:
            x = block(x, padding_bias)
        x = self.norm(x)
        return x * mask[..., None].to(x.dtype)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a tensors-only state dict (what `convert_state_dict` makes)."""
        return super().load_state_dict(with_extra_state(self, state_dict), strict=strict, assign=assign)
