"""The CLIP image encoder Wan2.1 I2V / FLF2V condition on: the vision tower of open-clip's XLM-RoBERTa ViT-H/14
(32 pre-norm blocks, width 1280, 16 heads, patch 14, 224 px). Wan reads the states after the penultimate block
(`use_31_block`; diffusers: CLIPVisionModel `hidden_states[-2]`): 257 tokens x 1280.

Patch embedding (no bias) + class token + learned positions, `pre_norm` LayerNorm, then blocks of
x + attn(norm1(x)), x + mlp(norm2(x)); LayerNorms in fp32 as Wan's. The last block and `post_norm` are held (so a
converted tower round-trips whole) but never run. Tensor parallel over megatron-core layers: heads split over the TP
ranks (column-parallel q / k / v, row-parallel output), the MLP column / row parallel.

    enc = CLIPVisionEncoder(clip_preset("open-clip-xlm-roberta-large-vit-huge-14"))
    enc.load_state_dict(convert_state_dict(sd, src="official", dst="megawan", config=enc.clip_config))
    tokens = enc(enc.preprocess(images))      # images [B, 3, H, W] in [-1, 1] -> [B, 257, 1280]
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megawan.config.clip import CLIP_MEAN, CLIP_STD, CLIPConfig, clip_config_from, clip_preset
from megawan.models.state import model_device, torch_dtype, with_extra_state
from megawan.parallel.groups import tensor_parallel_group

__all__ = ["CLIPVisionEncoder", "clip_preset", "clip_config_from", "CLIPConfig"]


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (Wan's clip.LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _linear(kind, in_size, out_size, config, tp_group):
    common = dict(config=config, init_method=config.init_method, bias=True, skip_bias_add=False, tp_group=tp_group)
    if kind == "column":
        return ColumnParallelLinear(in_size, out_size, gather_output=False, **common)
    return RowParallelLinear(in_size, out_size, input_is_parallel=True, **common)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig, config: TransformerConfig, tp_group):
        super().__init__()
        d = cfg.hidden_size
        self.heads_local, self.head_dim = cfg.num_attention_heads // tp_group.size(), d // cfg.num_attention_heads
        self.q = _linear("column", d, d, config, tp_group)
        self.k = _linear("column", d, d, config, tp_group)
        self.v = _linear("column", d, d, config, tp_group)
        self.proj = _linear("row", d, d, config, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (lin(x)[0].view(b, s, self.heads_local, self.head_dim).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # 1 / sqrt(head_dim), no mask: every token sees every token
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))[0]


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig, config: TransformerConfig, tp_group):
        super().__init__()
        self.fc1 = _linear("column", cfg.hidden_size, cfg.intermediate_size, config, tp_group)
        self.fc2 = _linear("row", cfg.intermediate_size, cfg.hidden_size, config, tp_group)
        self.activation = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu  # gelu: exact (erf), as nn.GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)[0]))[0]


class CLIPBlock(nn.Module):
    def __init__(self, cfg: CLIPConfig, config: TransformerConfig, tp_group):
        super().__init__()
        dtype = config.params_dtype
        self.norm1 = FP32LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.attn = CLIPAttention(cfg, config, tp_group)
        self.norm2 = FP32LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, config, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionEncoder(MegatronModule):
    def __init__(self, config: CLIPConfig, tp_group=None, device="cpu"):
        tp_group = tp_group if tp_group is not None else tensor_parallel_group()
        config.validate(tensor_parallel=tp_group.size())
        device = model_device(device)
        d = config.hidden_size
        init = functools.partial(nn.init.normal_, std=0.02)
        megatron = TransformerConfig(
            num_layers=config.num_hidden_layers, hidden_size=d, num_attention_heads=config.num_attention_heads,
            ffn_hidden_size=config.intermediate_size, tensor_model_parallel_size=tp_group.size(),
            add_bias_linear=True, params_dtype=torch_dtype(config.params_dtype),
            use_cpu_initialization=device.type != "cuda",  # on CUDA megatron creates each shard on the device
            gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
            init_method=init, output_layer_init_method=init,
        )
        super().__init__(config=megatron)
        self.clip_config = config
        self.tp_group = tp_group
        dtype = megatron.params_dtype
        with torch.device(device):  # every parameter is created where the encoder runs
            self.patch_embedding = nn.Conv2d(3, d, kernel_size=config.patch_size, stride=config.patch_size,
                                             bias=False, dtype=dtype)
            self.cls_embedding = nn.Parameter(init(torch.empty(d, dtype=dtype)))
            self.pos_embedding = nn.Parameter(init(torch.empty(config.num_tokens, d, dtype=dtype)))
            self.pre_norm = FP32LayerNorm(d, eps=config.layer_norm_eps, dtype=dtype)
            self.blocks = nn.ModuleList(CLIPBlock(config, megatron, tp_group) for _ in range(config.num_hidden_layers))
            self.post_norm = FP32LayerNorm(d, eps=config.layer_norm_eps, dtype=dtype)  # not run: see the docstring
            mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Wan's CLIP preprocessing: images [B, 3, H, W] in [-1, 1] -> bicubic resize to [B, 3, S, S]
        (align_corners=False, whatever the aspect ratio: Wan squashes, it does not crop) -> [0, 1] -> CLIP
        mean / std. Float32 out; `forward` casts to the encoder's dtype."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"CLIP preprocess: images must be a [B, 3, H, W] tensor (RGB in [-1, 1]), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"CLIP preprocess: images must be floats in [-1, 1], got {images.dtype}")
        low, high = images.min().item(), images.max().item()
        if low < -1.001 or high > 1.001:
            raise ValueError(f"CLIP preprocess: images must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}]")
        size = (self.clip_config.image_size,) * 2
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        return (x - self.pixel_mean.to(x.device)) / self.pixel_std.to(x.device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] (preprocessed) -> the states after the penultimate block [B, 1 + (S/patch)^2, width]."""
        size = self.clip_config.image_size
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            shape = tuple(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__
            raise ValueError(f"CLIP encoder: pixels must be [B, 3, {size}, {size}] (see preprocess), got {shape}")
        x = self.patch_embedding(pixels.to(self.pos_embedding.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embedding
        x = self.pre_norm(x)
        for block in self.blocks[:-1]:  # Wan: the first num_hidden_layers - 1 blocks
            x = block(x)
        return x

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a tensors-only state dict (what `convert_state_dict` makes)."""
        return super().load_state_dict(with_extra_state(self, state_dict), strict=strict, assign=assign)
