"""The VAE (and the GAN stage's discriminator) as megatron-core modules, so that `megawan train-vae` uses the
same data parallelism (megatron's DDP + distributed optimizer) and the same checkpoint format as `megawan train`.

    module = TrainableVAE(WanVAE(cfg))            # checkpoint keys: "vae.<WanVAE key>", e.g. vae.encoder.conv1.weight
    critic = TrainableDiscriminator(disc)         # "discriminator.<key>"

The models know nothing of this wrapper (torchtitan's separation): it only gives them the `config` megatron's
DDP reads and the replicated `sharded_state_dict` megawan.checkpoint saves; the wrapped module's own names
are kept below its prefix, so a checkpoint's VAE tensors are WanVAE's (= diffusers') names behind "vae.".
"""

from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

VAE_PREFIX = "vae."  # a train-vae checkpoint's VAE tensors: vae.<WanVAE key>
DISCRIMINATOR_PREFIX = "discriminator."  # its discriminator's (GAN stage)


def _megatron_config(module: nn.Module) -> TransformerConfig:
    """The few fields megatron's DDP and optimizer read (dtype, no TP / PP); the layer counts are placeholders
    megatron's dataclass requires, not used by anything that runs on these modules."""
    dtype = next(module.parameters()).dtype
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, params_dtype=dtype,
                             bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
                             gradient_accumulation_fusion=False)


class TrainableVAE(MegatronModule):
    def __init__(self, vae: nn.Module):
        super().__init__(_megatron_config(vae))
        self.vae = vae

    def forward(self, *args, **kwargs):
        return self.vae(*args, **kwargs)


class TrainableDiscriminator(MegatronModule):
    def __init__(self, discriminator: nn.Module):
        super().__init__(_megatron_config(discriminator))
        self.discriminator = discriminator

    def forward(self, *args, **kwargs):
        return self.discriminator(*args, **kwargs)
