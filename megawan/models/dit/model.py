"""The Wan DiT (Wan2.1 / Wan2.2 `WanModel`) on megatron-core.

    latents [B, C, T, H, W] --patch 1x2x2--> tokens (frame-major t, h, w) [s, B, dim]
    timestep -> sinusoid -> e (head) and e0 (six modulation vectors per block)
    text [B, L, 4096] (zero-padded to text_len) -> text tokens [L, B, dim]
    N x WanBlock(self-attn with 3D RoPE, cross-attn, MLP)
    head: LN, modulation (table + e), Linear -> unpatchify -> velocity [B, C_out, T, H, W]

Variants by config: T2V; I2V (in_dim 36: noisy latents + mask + image latents; Wan2.1 also CLIP image
tokens through its own key / value projections); TI2V (Wan2.2 5B: a timestep per token); A14B (two of
these, see experts.py). The model knows nothing of how it is parallelised beyond the TP group its layers
are given.
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

from megawan.capabilities import cuda_available, resolve_backend
from megawan.config import DiTConfig, ParallelConfig
from megawan.config.te_limits import CP_COMM_TYPES, te_layout_problem, te_tokens_problem
from megawan.models.dit.embeddings import ImageEmbedding, TextEmbedding, TimeEmbedding
from megawan.models.dit.norms import compute_dtype, layer_norm_fp32, upcast
from megawan.models.dit.rope import rope_cos_sin
from megawan.models.dit.seeding import component_rng, new_init_seed
from megawan.models.dit.specs import get_wan_block_spec
from megawan.models.state import model_device, torch_dtype, with_extra_state
from megawan.parallel.context_parallel import gather_sequence, pad_sequence, padded_length
from megawan.parallel.cpu_compat import cpu_mode_active
from megawan.parallel.groups import (ContextParallelGroups, context_parallel_groups, sequence_parallel_enabled,
                                     tensor_parallel_group)


def megatron_config(cfg: DiTConfig, tensor_parallel: int, sequence_parallel: bool = False,
                    pipeline_parallel: int = 1, virtual_pipeline: Optional[int] = None,
                    cp: Optional[ContextParallelGroups] = None,
                    device: torch.device = torch.device("cpu")) -> TransformerConfig:
    """The megatron-core TransformerConfig our layers (and megatron's pipeline schedules) work from, for a model
    built on `device`. cp: the context-parallel groups; TE's attention builds its CP from the size and
    cp_comm_type set here (and, for a2a+p2p, megatron's hierarchical CP groups, which
    megawan.parallel.initialize creates to match)."""
    cp_size = 1 if cp is None else cp.size
    return TransformerConfig(
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        context_parallel_size=cp_size,
        cp_comm_type=CP_COMM_TYPES[cp.mode] if cp_size > 1 else None,
        hierarchical_context_parallel_sizes=(
            [dist.get_world_size(cp.ulysses), dist.get_world_size(cp.ring)] if cp_size > 1 and cp.mode == "2d"
            else None),
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        pipeline_dtype=torch_dtype(cfg.params_dtype),
        num_layers=cfg.num_layers,
        hidden_size=cfg.dim,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_dim,
        tensor_model_parallel_size=tensor_parallel,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=functools.partial(F.gelu, approximate="tanh"),
        bias_activation_fusion=False,
        layernorm_epsilon=cfg.eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch_dtype(cfg.params_dtype),
        # CPU: initialise the full master weight, then split (the same model for any TP size). CUDA: megatron
        # creates and initialises each TP shard on the current device, seeded per TP rank by its CUDA RNG tracker
        # (other values than on CPU, and no full-size copy on the host).
        use_cpu_initialization=device.type != "cuda",
        gradient_accumulation_fusion=False,
        init_method=functools.partial(xavier_uniform_whole, tensor_parallel=tensor_parallel),
        output_layer_init_method=functools.partial(xavier_uniform_whole, tensor_parallel=tensor_parallel),
    )


def xavier_uniform_whole(weight: torch.Tensor, tensor_parallel: int = 1) -> torch.Tensor:
    """Xavier-uniform with the bound of the whole weight. megatron's GPU initialisation hands the init one TP
    shard (marked `tensor_model_parallel`, split on `partition_dim`), whose own fans would widen the bound with
    the TP size; its CPU initialisation hands it the whole weight (unmarked): plain xavier."""
    if tensor_parallel == 1 or not getattr(weight, "tensor_model_parallel", False):
        return nn.init.xavier_uniform_(weight)
    shape = list(weight.shape)
    shape[weight.partition_dim] *= tensor_parallel
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class WanHead(nn.Module):
    """Final LayerNorm modulated by (table + e), then Linear to out_dim x patch volume."""

    def __init__(self, dim: int, out_features: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 2, dim, dtype=dtype) / dim**0.5)
        self.linear = nn.Linear(dim, out_features, dtype=dtype)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [s, b, dim]; e [1 or s, b, dim] fp32."""
        shift, scale = (upcast(self.modulation) + e.unsqueeze(-2)).unbind(dim=-2)
        return self.linear((layer_norm_fp32(x, self.eps) * (1 + scale) + shift).type_as(x))


class WanDiT(MegatronModule):
    """The Wan DiT, or one pipeline stage of it.

    A stage holds the blocks `layers` (global indices); the first (pre_process) adds the patch embedding,
    the last (post_process) the head. Every stage embeds the text and the timestep itself (cheap next to a
    block) rather than receiving them: those parameters are pipeline-shared, marked `pipeline_shared`, and
    their gradients are summed over the stages (megawan.training.schedule.finalize_model_grads).
    """

    def __init__(self, config: DiTConfig, tp_group=None, layers: Optional[range] = None, pre_process: bool = True,
                 post_process: bool = True, pipeline_parallel: int = 1, virtual_pipeline: Optional[int] = None,
                 block_spec: Optional[ModuleSpec] = None, device="cpu", init_seed: Optional[int] = None):
        """block_spec: the blocks' layer spec; default the backend's (specs.get_wan_block_spec). The TE contract
        test passes the te spec's interface on local classes. device: where every parameter is created.
        init_seed: what each component's initialisation is seeded from (with the component's global name, so that
        the chunks of one model share it); None: drawn from torch's global generator."""
        tp_group = tp_group if tp_group is not None else tensor_parallel_group()
        config.validate(tensor_parallel=tp_group.size())
        device = model_device(device)
        cp = context_parallel_groups()  # video tokens split over these ranks, if any
        super().__init__(config=megatron_config(config, tp_group.size(), sequence_parallel_enabled(),
                                                pipeline_parallel, virtual_pipeline, cp, device))
        self.dit_config = config
        self.tp_group = tp_group
        self.layers = range(config.num_layers) if layers is None else layers
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        self.share_embeddings_and_output_weights = False  # read by megatron's finalize_model_grads
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.cp = cp
        self.backend = resolve_backend(config.backend)
        if self.backend == "te" and cp is not None:
            problem = te_layout_problem(config.head_dim, self._layout())
            if problem:
                raise ValueError(f"{problem}; model.backend=local runs this layout")
        dtype = self.config.params_dtype
        dim = config.dim

        # every component is initialised from its own seed, derived from its global name: any split into stages
        # and chunks builds the model one rank builds, and every stage's copy of the shared embeddings is alike
        self.init_seed = new_init_seed() if init_seed is None else init_seed
        self._device = torch.device(device)
        with torch.device(device):  # every parameter is created where the model runs (megatron's own included)
            with self._seeded("patch_embedding"):
                self.patch_embedding = (
                    nn.Conv3d(config.in_dim, dim, config.patch_size, stride=config.patch_size, dtype=dtype)
                    if pre_process else None
                )
            with self._seeded("text_embedding"):
                self.text_embedding = TextEmbedding(config.text_dim, dim).to(dtype)
            with self._seeded("time_embedding"):
                self.time_embedding = TimeEmbedding(config.freq_dim, dim).to(dtype)
            with self._seeded("image_embedding"):
                self.image_embedding = (
                    ImageEmbedding(config.image_dim, dim, config.image_pos_len).to(dtype) if config.image_dim else None
                )
            spec = block_spec if block_spec is not None else get_wan_block_spec(self.backend)
            blocks = []
            for i in self.layers:
                with self._seeded(f"blocks.{i}"):
                    blocks.append(build_module(spec, config=self.config, layer_number=i + 1, tp_group=tp_group,
                                               dit_config=config))
            self.blocks = nn.ModuleList(blocks)
            with self._seeded("head"):
                self.head = (WanHead(dim, config.out_dim * config.patch_volume, config.eps, dtype)
                             if post_process else None)
        for module in (self.text_embedding, self.time_embedding, self.image_embedding):
            for p in (module.parameters() if module is not None else ()):
                p.pipeline_shared = True
        if self.config.sequence_parallel:
            self._mark_sequence_parallel_parameters()

    def _mark_sequence_parallel_parameters(self) -> None:
        """Replicated parameters that act on sequence-split tokens get only their tokens' share of the
        gradient on each TP rank; megatron sums the grads of parameters marked `sequence_parallel` over the
        TP group (row-parallel biases are marked by megatron itself). Text and image embeddings are not
        marked: the cross-attention's key / value projections see every text token on every rank."""
        modules = [m for m in (self.patch_embedding, self.time_embedding, self.head) if m is not None]  # PP stage
        modules += [block.cross_attention_norm for block in self.blocks]
        params = [p for m in modules for p in m.parameters()] + [block.modulation for block in self.blocks]
        for p in params:
            p.sequence_parallel = True

    @contextlib.contextmanager
    def _seeded(self, name: str):
        """Build and initialise the component `name` (its name in the whole model) from its own seed."""
        with component_rng(zlib.crc32(f"{self.init_seed}/{name}".encode()), self._device, self.tp_group.rank()):
            yield
            self._init_weights(name)

    @torch.no_grad()
    def _init_weights(self, name: str) -> None:
        """Wan's init for training from scratch (block linears get xavier through megatron's init_method):
        xavier for the replicated linears and the patch embedding, N(0, 0.02) for the text and time
        embeddings, a zero output layer so that the untrained model predicts zero velocity."""
        module = getattr(self, name, None)
        if name == "patch_embedding" and module is not None:
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            nn.init.zeros_(module.bias)
        elif name in ("text_embedding", "time_embedding", "image_embedding") and module is not None:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    if name == "image_embedding":
                        nn.init.xavier_uniform_(layer.weight)
                    else:
                        nn.init.normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)
        elif name == "head" and module is not None:
            nn.init.zeros_(module.linear.weight)
            nn.init.zeros_(module.linear.bias)

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand a non-first stage the previous stage's output here."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a tensors-only state dict (what `convert_state_dict` makes)."""
        return super().load_state_dict(with_extra_state(self, state_dict), strict=strict, assign=assign)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron-core dist_checkpointing view: TP-split tensors carry their global shape and offset, so a
        checkpoint saved at one TP size loads at any other."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = {}
        for name, child in self.named_children():
            if isinstance(child, nn.ModuleList):  # megatron's default would treat a ModuleList as replicated
                for i, block in zip(self.layers, child):  # global block numbers: any PP layout loads it
                    out.update(block.sharded_state_dict(f"{prefix}{name}.{i}.", sharded_offsets, metadata))
            else:
                part = sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                  tp_group=self.tp_group)
                if name in ("text_embedding", "time_embedding", "image_embedding") and not self.pre_process:
                    for tensor in part.values():  # every stage has a copy; the first stage's is the one saved
                        tensor.replica_id = (1, *tensor.replica_id[1:]) if isinstance(tensor.replica_id, tuple) else 1
                out.update(part)
        return out

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """latents [B, C_in, T, H, W]; timestep [B] or [B, L] (per token, L = T/pt * H/ph * W/pw) in Wan's
        units 0-1000; text [B, L_txt <= text_len, text_dim]; image: CLIP tokens [B, L_img, image_dim]
        (Wan2.1 I2V). Returns the flow-matching velocity [B, C_out, T, H, W]."""
        cfg = self.dit_config
        b, _, t, h, w = latents.shape
        pt, ph, pw = cfg.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size (T={t}, H={h}, W={w}) is not divisible by the patch size {cfg.patch_size}")
        grid = (t // pt, h // ph, w // pw)

        tokens = grid[0] * grid[1] * grid[2]
        dtype = self.text_embedding.linear_1.weight.dtype
        rope = rope_cos_sin(grid, cfg.rope_split, cfg.rope_theta, device=latents.device, dtype=compute_dtype(dtype))

        e, e0 = self.time_embedding(timestep)  # [B(, s), dim], [B(, s), 6, dim]
        if timestep.dim() == 1:  # one t per sample: broadcast over the sequence
            e, e0 = e.unsqueeze(0), e0.unsqueeze(0)
        else:
            if timestep.shape[1] != tokens:
                raise ValueError(f"per-token timestep has {timestep.shape[1]} entries for {tokens} tokens")
            e, e0 = e.transpose(0, 1), e0.transpose(0, 1)

        context = self.text_embedding(self._pad_text(text)).transpose(0, 1)  # [L, B, dim]
        image_context = None
        if self.image_embedding is not None:
            if image is None:
                raise ValueError(f"{cfg.name} is an image-conditioned model: pass the CLIP image tokens as image=")
            image_context = self.image_embedding(image.to(dtype)).transpose(0, 1)

        # Context parallel: this rank keeps its contiguous chunk of the token sequence (padded at the end to a
        # multiple of CP x TP). Sequence parallel: of that chunk, the TP rank's slice lives between the TP
        # linears (the column-parallel ones gather the chunk, so RoPE covers the whole chunk).
        cp_size, cp_rank = (self.cp.size, self.cp.rank) if self.cp is not None else (1, 0)
        sp = self.tp_group.size() if self.config.sequence_parallel else 1
        if sp > 1 and not cuda_available() and not cpu_mode_active():
            raise RuntimeError("sequence parallelism on CPU runs megatron-core's CUDA-minded collectives: call the "
                               "model inside megawan.parallel.cpu_compat.megatron_cpu_mode()")
        if self.pre_process:
            x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))  # [B, dim, f, h, w]
            x = x.flatten(2).permute(2, 0, 1).contiguous()  # [s, B, dim], frame-major
            if cp_size * sp > 1:
                x = self._split_tokens(x, cp_rank, cp_size, sp)
        else:  # a later pipeline stage: this rank's tokens as the previous stage left them
            x = self.input_tensor
        mask = None
        if cp_size * sp > 1:
            mask = self._padding_mask(tokens, cp_size * sp, b, latents.device)
            rope = tuple(pad_sequence(t, cp_size * sp).chunk(cp_size)[cp_rank] for t in rope)
            if timestep.dim() == 2:
                e, e0 = self._split_tokens(e, cp_rank, cp_size, sp), self._split_tokens(e0, cp_rank, cp_size, sp)

        for block in self.blocks:
            x = block(x, e0, context, rope, image_context, mask)

        if not self.post_process:
            return x
        x = self.head(x, e)  # [s, B, C_out * pt * ph * pw]
        if sp > 1:
            x = gather_sequence(x, self.tp_group)
        if cp_size > 1:
            x = gather_sequence(x, self.cp.group)
        return self._unpatchify(x[:tokens], grid)

    def _padding_mask(self, tokens: int, multiple: int, batch: int, device) -> Optional[torch.Tensor]:
        """The self-attention's padding mask, as TE takes it: bool [b, 1, 1, S] over the whole padded sequence
        (S = tokens padded to a multiple of CP x SP), True at the padding; None when nothing is padded."""
        if self.backend == "te" and self.cp is not None:  # preflight refuses these buckets before any rank starts
            problem = te_tokens_problem(tokens, self._layout())
            if problem:
                raise ValueError(f"model.backend=te: {problem}; model.backend=local takes this sequence")
        padded = padded_length(tokens, multiple)
        if padded == tokens:
            return None
        return (torch.arange(padded, device=device) >= tokens).view(1, 1, 1, padded).repeat(batch, 1, 1, 1)

    def _layout(self) -> ParallelConfig:
        """This model's split of the sequence, in the terms of megawan.config.te_limits."""
        cp = self.cp
        return ParallelConfig(
            tensor_parallel=self.tp_group.size(), sequence_parallel=self.config.sequence_parallel,
            context_parallel=1 if cp is None else cp.size, context_parallel_mode="ring" if cp is None else cp.mode,
            ulysses_size=dist.get_world_size(cp.ulysses) if cp is not None and cp.mode == "2d" else None)

    def _split_tokens(self, x: torch.Tensor, cp_rank: int, cp_size: int, sp: int) -> torch.Tensor:
        """This rank's tokens: the sequence padded at the end to a multiple of CP x SP, its CP chunk, then its
        TP slice under sequence parallelism. A plain slice: every rank computed x whole, so each keeps its
        share of the gradient."""
        x = pad_sequence(x, cp_size * sp).chunk(cp_size)[cp_rank]
        return x.chunk(sp)[self.tp_group.rank()] if sp > 1 else x

    def _pad_text(self, text: torch.Tensor) -> torch.Tensor:
        """Zero-pad text states to text_len as Wan does (padded tokens are attended, through the bias)."""
        n = text.shape[1]
        if n > self.dit_config.text_len:
            raise ValueError(f"text has {n} tokens, more than text_len={self.dit_config.text_len}")
        return F.pad(text.to(self.text_embedding.linear_1.weight.dtype), (0, 0, 0, self.dit_config.text_len - n))

    def _unpatchify(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        f, h, w = grid
        pt, ph, pw = self.dit_config.patch_size
        x = x.transpose(0, 1).reshape(x.shape[1], f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, pt, h, ph, w, pw]
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

