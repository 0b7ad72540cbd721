"""Run configuration: dataclasses, model presets, YAML loading, `key=value` overrides, validation.

One config per run. Every field has a default; an unknown key is an error that names the key (and the
nearest known one); impossible values are rejected by `validate()` before any rank starts, with a message
naming the field.

    cfg = load_config("examples/configs/tiny_tp2.yaml", ["model.num_layers=4", "parallel.tensor_parallel=2"])
    dit = dit_preset("wan2.1-t2v-1.3b")                # the official hyper-parameters
    dit = dit_config_from(json.load(open("config.json")))  # official Wan or diffusers config.json
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot work. The message names the offending field."""


MODEL_TYPES = ("t2v", "i2v", "ti2v")
BACKENDS = ("auto", "local", "te")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: numerical checks only


@dataclass
class DiTConfig:
    """Hyper-parameters of one Wan DiT (one expert, for the two-expert A14B models).

    Names follow the official Wan `WanModel` arguments (dim, ffn_dim, num_heads, …).
    """

    name: str = "custom"
    model_type: str = "t2v"  # t2v | i2v (first-frame latents concatenated: in_dim 36) | ti2v (Wan2.2 5B)
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal timestep-embedding width
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512  # text tokens are zero-padded to this length, as Wan does
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True  # RMSNorm over the full hidden size on q and k
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention
    image_dim: Optional[int] = None  # CLIP image-token width (1280) of Wan2.1 I2V; None: no image branch
    image_pos_len: Optional[int] = None  # learned position table of FLF2V image tokens (2 x 257)
    rope_theta: float = 10000.0
    rope_max_len: int = 1024  # largest latent frame / height / width index in patches
    expert_boundary: Optional[float] = None  # A14B: t / 1000 >= boundary -> high-noise expert
    backend: str = "auto"  # local (pure torch) | te (Transformer Engine) | auto (te when usable)
    params_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple:
        """(t, h, w) parts of the head dim that 3D RoPE rotates: (d - 4*(d//6), 2*(d//6), 2*(d//6))."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def validate(self, tensor_parallel: int = 1, prefix: str = "model") -> "DiTConfig":
        def need(ok: bool, field_name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{field_name}: {why}")

        need(self.model_type in MODEL_TYPES, "model_type", f"{self.model_type!r} is not one of {MODEL_TYPES}")
        need(self.backend in BACKENDS, "backend", f"{self.backend!r} is not one of {BACKENDS}")
        need(self.params_dtype in DTYPES, "params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        for name in ("in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "text_len", "num_heads", "num_layers"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(len(self.patch_size) == 3 and all(p > 0 for p in self.patch_size), "patch_size",
             f"must be three positive ints (t, h, w), got {self.patch_size}")
        need(self.dim % self.num_heads == 0, "num_heads", f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        need(self.head_dim % 2 == 0 and self.head_dim >= 6, "num_heads",
             f"head dim {self.head_dim} (dim / num_heads) must be even and >= 6 for 3D RoPE")
        need(self.freq_dim % 2 == 0, "freq_dim", f"must be even, got {self.freq_dim}")
        need(self.model_type != "i2v" or self.in_dim > self.out_dim, "in_dim",
             f"an i2v model takes the noisy latents plus mask and image latents: in_dim ({self.in_dim}) must exceed out_dim ({self.out_dim})")
        need(self.image_pos_len is None or self.image_dim is not None, "image_pos_len", "needs image_dim")
        need(self.expert_boundary is None or 0.0 < self.expert_boundary < 1.0, "expert_boundary",
             f"must lie in (0, 1), got {self.expert_boundary}")
        need(tensor_parallel >= 1, "tensor_parallel", "must be >= 1")
        if tensor_parallel > 1:
            need(self.num_heads % tensor_parallel == 0, "num_heads",
                 f"num_heads={self.num_heads} is not divisible by tensor_parallel={tensor_parallel}")
            need(self.ffn_dim % tensor_parallel == 0, "ffn_dim",
                 f"ffn_dim={self.ffn_dim} is not divisible by tensor_parallel={tensor_parallel}")
        return self


CP_MODES = ("ulysses", "ring", "2d")


@dataclass
class ParallelConfig:
    """How ranks are laid out: world = data x pipeline x context x tensor (megatron-core's order)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    context_parallel: int = 1
    # ulysses: all-to-all, heads scattered; ring: K/V passed around with online softmax;
    # 2d: ulysses inside groups of `ulysses_size` ranks (a node), ring across them (the Wan report's layout)
    context_parallel_mode: str = "ulysses"
    ulysses_size: Optional[int] = None
    sequence_parallel: bool = False
    recompute: str = "none"  # none | full (whole blocks) | selective (core attention only)
    recompute_every: int = 1  # full: recompute every N-th block
    offload_blocks: int = 0  # activations of the first N blocks of each stage in pinned host memory (plan_parallel)

    def validate(self, world_size: Optional[int] = None, prefix: str = "parallel") -> "ParallelConfig":
        def need(ok: bool, field_name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{field_name}: {why}")

        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        need(self.virtual_pipeline is None or self.virtual_pipeline >= 1, "virtual_pipeline", "must be >= 1")
        need(self.virtual_pipeline is None or self.pipeline_parallel > 1, "virtual_pipeline",
             "interleaving needs pipeline_parallel > 1")
        need(self.context_parallel_mode in CP_MODES, "context_parallel_mode",
             f"{self.context_parallel_mode!r} is not one of {CP_MODES}")
        if self.context_parallel_mode == "2d" and self.context_parallel > 1:
            u = self.ulysses_size
            need(u is not None and 1 < u < self.context_parallel and self.context_parallel % u == 0, "ulysses_size",
                 f"2d context parallelism needs 1 < ulysses_size < context_parallel={self.context_parallel} "
                 f"dividing it, got {u}")
        need(self.recompute in ("none", "full", "selective"), "recompute",
             f"{self.recompute!r} is not one of none, full, selective")
        need(self.recompute_every >= 1, "recompute_every", f"must be >= 1, got {self.recompute_every}")
        need(self.offload_blocks >= 0, "offload_blocks", f"must be >= 0, got {self.offload_blocks}")
        need(not self.sequence_parallel or self.tensor_parallel > 1, "sequence_parallel",
             "sequence parallelism splits activations over TP ranks: it needs tensor_parallel > 1")
        if world_size is not None:
            model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
            need(world_size % model_parallel == 0, "tensor_parallel",
                 f"world size {world_size} is not divisible by tensor x pipeline x context parallel = {model_parallel}")
        return self

    @property
    def ulysses_degree(self) -> int:
        """Ranks over which attention heads are scattered by all-to-all."""
        if self.context_parallel == 1 or self.context_parallel_mode == "ring":
            return 1
        return self.context_parallel if self.context_parallel_mode == "ulysses" else self.ulysses_size

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)


@dataclass
class DataConfig:
    """Where a stage's samples come from: the latent store, its buckets and the batch sizes."""

    store: str = ""  # the Zarr latent store (tools/precompute_latents.py)
    buckets: tuple = ()  # bucket names this stage trains on; empty = every bucket of the store
    video_ratio: float = 1.0  # fraction of steps drawn from video buckets (the rest: image buckets)
    global_batch_size: int = 8  # samples per step over all data-parallel ranks, video buckets
    image_global_batch_size: Optional[int] = None  # image buckets (default: global_batch_size)
    micro_batch_size: int = 1  # samples per forward / backward on a rank
    num_workers: int = 2  # loader read-ahead threads

    def validate(self, prefix: str = "data") -> "DataConfig":
        if not 0.0 <= self.video_ratio <= 1.0:
            raise ConfigError(f"{prefix}.video_ratio: {self.video_ratio} is not within [0, 1]")
        for name in ("global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be at least 1")
        if self.image_global_batch_size is not None and self.image_global_batch_size < 1:
            raise ConfigError(f"{prefix}.image_global_batch_size: must be at least 1")
        return self


@dataclass
class OptimizerConfig:
    """AdamW (megatron-core's distributed optimizer) and its learning-rate schedule."""

    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear
    decay_steps: Optional[int] = None  # default: train.steps
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 = no clipping

    def validate(self, prefix: str = "optimizer") -> "OptimizerConfig":
        if self.decay not in ("constant", "cosine", "linear"):
            raise ConfigError(f"{prefix}.decay: {self.decay!r} is not constant, cosine or linear")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.lr / min_lr: need 0 <= min_lr <= lr and lr > 0, got {self.lr}, {self.min_lr}")
        return self


@dataclass
class TrainConfig:
    """The training loop: length, precision, flow-matching settings, EMA, failure handling."""

    steps: int = 1000
    precision: str = "bf16"  # bf16 (fp32 main weights in the optimizer) | fp32
    fp8: Optional[str] = None  # delayed (Transformer Engine) | current (TE, or plain torch FP8 on the local backend)
    fp8_attention: bool = False  # self-attention in FP8 too (TE's fp8_dpa; local backend: kernels/fp8_flash_attention.py)
    shift: float = 5.0  # Wan's timestep shift for training
    timestep_distribution: str = "uniform"  # uniform | logit_normal
    expert: Optional[str] = None  # A14B: train the "high" or "low" noise expert on its own timestep range
    ema_decay: float = 0.0  # 0 = no EMA
    max_bad_steps: int = 5  # NaN / inf losses in a row before the run stops
    log_every: int = 1
    memory_budget_gb: Optional[float] = None  # refuse buckets whose estimated step does not fit
    text_dropout: float = 0.0  # probability that a sample trains with zero text states (the null condition CFG uses)

    def validate(self, prefix: str = "train") -> "TrainConfig":
        def need(ok, name, why):
            if not ok:
                raise ConfigError(f"{prefix}.{name}: {why}")

        need(self.steps >= 1, "steps", "must be at least 1")
        need(self.precision in ("bf16", "fp32"), "precision", f"{self.precision!r} is not bf16 or fp32")
        need(self.fp8 in (None, "delayed", "current"), "fp8", f"{self.fp8!r} is not delayed or current")
        need(not self.fp8_attention or self.fp8 is not None, "fp8_attention", "needs train.fp8 (delayed or current)")
        need(self.shift > 0, "shift", "must be positive")
        need(self.timestep_distribution in ("uniform", "logit_normal"), "timestep_distribution",
             f"{self.timestep_distribution!r} is not uniform or logit_normal")
        need(self.expert in (None, "high", "low"), "expert", f"{self.expert!r} is not high or low")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        need(self.max_bad_steps >= 1, "max_bad_steps", "must be at least 1")
        need(0.0 <= self.text_dropout < 1.0, "text_dropout", "must be in [0, 1)")
        return self


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 100  # steps between checkpoints (also written on SIGTERM / SIGUSR1 and at the end)
    keep: int = 3  # the newest K complete checkpoints are kept
    init_from: Optional[str] = None  # warm start: weights only, from a checkpoint of an earlier stage


@dataclass
class LoggingConfig:
    dir: Optional[str] = None  # metrics.jsonl and TensorBoard events (default: <checkpoint.dir>/logs)
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress: bool = True


@dataclass
class ValidationConfig:
    """Every `every` steps: the loss on held-out latents at fixed flow times, and videos sampled for held-out
    prompts (decoded with the VAE: mp4 per prompt + a contact sheet). The held-out store is precomputed like
    the training store, from clips kept out of it."""

    every: int = 0  # steps between validations; 0 = never
    store: Optional[str] = None  # held-out latent store (tools/precompute_latents.py)
    loss_timesteps: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)  # flow times (unshifted) of the held-out loss
    loss_samples: int = 0  # held-out samples per bucket in the loss; 0 = all
    num_samples: int = 4  # prompts sampled: the first ones of `bucket` in the held-out store
    bucket: Optional[str] = None  # the shape sampled; default: the held-out store's first video bucket
    sampler: str = "unipc"  # unipc | euler
    steps: int = 20
    shift: float = 5.0  # sampling shift (Wan: 5.0 at 480p, 3.0 at 720p... as the official generate.py)
    guidance: float = 1.0  # classifier-free guidance; the unconditional pass uses zero text states
    batch_size: int = 4  # prompts sampled together by one model replica
    use_ema: bool = True  # sample and measure with the EMA weights when the run keeps an EMA
    vae: Optional[str] = None  # VAE weights for decoding (any layout megawan.models.loading reads); None = no videos
    vae_config: Optional[str] = None  # its preset; default: the store's
    fps: int = 16
    seed: int = 1234

    def validate(self, prefix: str = "validation") -> "ValidationConfig":
        def need(ok, name, why):
            if not ok:
                raise ConfigError(f"{prefix}.{name}: {why}")

        need(self.every >= 0, "every", "must be 0 (off) or a number of steps")
        need(self.every == 0 or bool(self.store), "store", "validation.every is set but no held-out store is given")
        need(all(0.0 < t < 1.0 for t in self.loss_timesteps), "loss_timesteps", "flow times must be in (0, 1)")
        need(self.sampler in ("unipc", "euler"), "sampler", f"{self.sampler!r} is not unipc or euler")
        need(self.steps >= 1 and self.num_samples >= 0 and self.batch_size >= 1, "steps",
             "steps and batch_size must be at least 1, num_samples at least 0")
        need(self.shift > 0, "shift", "must be positive")
        return self


@dataclass
class RunConfig:
    """The whole run: one YAML file maps onto this."""

    model: DiTConfig = field(default_factory=DiTConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    seed: int = 0

    def validate(self, world_size: Optional[int] = None) -> "RunConfig":
        p = self.parallel.validate(world_size)
        self.model.validate(tensor_parallel=p.tensor_parallel)
        self.data.validate()
        self.optimizer.validate()
        self.train.validate()
        self.validation.validate()
        if self.train.expert is not None and self.model.expert_boundary is None:
            raise ConfigError(f"train.expert: {self.model.name} has no experts (model.expert_boundary is unset)")
        if self.checkpoint.every < 1 or self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.every / checkpoint.keep: must be at least 1")
        heads_split = p.tensor_parallel * p.ulysses_degree
        if self.model.num_heads % heads_split:
            raise ConfigError(
                f"model.num_heads: {self.model.num_heads} heads do not split over tensor_parallel x ulysses "
                f"context parallel = {heads_split} ranks (use context_parallel_mode=ring or fewer ranks)")
        if self.model.num_layers % (p.pipeline_parallel * (p.virtual_pipeline or 1)):
            raise ConfigError(
                f"model.num_layers: {self.model.num_layers} blocks do not split into pipeline_parallel x "
                f"virtual_pipeline = {p.pipeline_parallel * (p.virtual_pipeline or 1)} stages")
        chunk_blocks = self.model.num_layers // (p.pipeline_parallel * (p.virtual_pipeline or 1))
        if p.offload_blocks > chunk_blocks:
            raise ConfigError(f"parallel.offload_blocks: {p.offload_blocks} is more than the {chunk_blocks} blocks "
                              "of a model chunk")
        return self


# ----------------------------------------------------------------------------------------------
# Presets: the official hyper-parameters (Wan-Video config.json files), and tiny ones for tests.

_WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

_PRESETS: dict = {
    "wan2.1-t2v-1.3b": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(model_type="t2v", **_WAN_14B),
    "wan2.1-i2v-14b": dict(model_type="i2v", in_dim=36, image_dim=1280, **_WAN_14B),
    "wan2.1-flf2v-14b": dict(model_type="i2v", in_dim=36, image_dim=1280, image_pos_len=514, **_WAN_14B),
    "wan2.2-ti2v-5b": dict(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30),
    # A14B: two experts of the 14B architecture; Wan2.2 I2V conditions through the latents only (no CLIP).
    "wan2.2-t2v-a14b": dict(model_type="t2v", expert_boundary=0.875, **_WAN_14B),
    "wan2.2-i2v-a14b": dict(model_type="i2v", in_dim=36, expert_boundary=0.900, **_WAN_14B),
}
_TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=24, text_len=16, rope_max_len=64)
_PRESETS.update({
    "tiny": dict(model_type="t2v", **_TINY),
    "tiny-i2v": dict(model_type="i2v", in_dim=36, image_dim=20, **_TINY),
    "tiny-ti2v": dict(model_type="ti2v", in_dim=48, out_dim=48, **_TINY),
    "tiny-a14b": dict(model_type="t2v", expert_boundary=0.875, **_TINY),
})


def preset_names() -> list:
    return sorted(_PRESETS)


def dit_preset(name: str, **overrides: Any) -> DiTConfig:
    """The DiT config of a named model: `dit_preset("wan2.1-t2v-14b")`, `dit_preset("tiny", num_layers=3)`."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown DiT preset {name!r}{_did_you_mean(name, _PRESETS)}; known: {', '.join(preset_names())}")
    values = {"name": name, **_PRESETS[name]}
    values.update(overrides)
    return _build(DiTConfig, values, "model").validate()


def dit_config_from(config_json: dict, state_dict_keys=None, **overrides: Any) -> DiTConfig:
    """DiTConfig from the config.json dict of an official Wan checkpoint or of a diffusers one.

    `state_dict_keys` (official checkpoints): decides whether an i2v model has the CLIP image branch
    (Wan2.1 I2V / FLF2V) or not (Wan2.2 I2V-A14B); without it an official i2v config means Wan2.1.
    """
    if "num_attention_heads" in config_json:  # diffusers WanTransformer3DModel
        c = config_json
        in_dim = c.get("in_channels", 16)
        if c.get("image_dim") is not None or in_dim == 36:
            model_type = "i2v"
        elif in_dim == 48:
            model_type = "ti2v"
        else:
            model_type = "t2v"
        values = dict(
            name="diffusers", model_type=model_type, in_dim=in_dim, out_dim=c.get("out_channels") or in_dim,
            dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c.get("ffn_dim", 13824),
            freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096), num_heads=c["num_attention_heads"],
            num_layers=c.get("num_layers", 40), patch_size=tuple(c.get("patch_size", (1, 2, 2))),
            eps=c.get("eps", 1e-6), qk_norm=c.get("qk_norm") is not None, cross_attn_norm=c.get("cross_attn_norm", True),
            image_dim=c.get("image_dim"), image_pos_len=c.get("pos_embed_seq_len"),
            rope_max_len=c.get("rope_max_seq_len", 1024),
        )
    elif "num_heads" in config_json and "dim" in config_json:  # official Wan WanModel
        c = config_json
        model_type = c.get("model_type", "t2v")
        flf2v = model_type == "flf2v"
        if flf2v:
            model_type = "i2v"
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r} is not supported (one of {MODEL_TYPES})")
        # Wan2.1 I2V / FLF2V carry CLIP image tokens, Wan2.2 I2V-A14B conditions through latents only, and
        # their config.json files look alike: the state dict's keys tell them apart when given.
        if state_dict_keys is not None:
            keys = set(state_dict_keys)
            image_dim = 1280 if "img_emb.proj.1.weight" in keys else None
            flf2v = "img_emb.emb_pos" in keys
        else:
            image_dim = 1280 if model_type == "i2v" else None
        values = dict(
            name="official", model_type=model_type, in_dim=c.get("in_dim", 16), out_dim=c.get("out_dim", 16),
            dim=c["dim"], ffn_dim=c["ffn_dim"], freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096),
            text_len=c.get("text_len", 512), num_heads=c["num_heads"], num_layers=c["num_layers"],
            patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6), qk_norm=c.get("qk_norm", True),
            cross_attn_norm=c.get("cross_attn_norm", True), image_dim=image_dim,
            image_pos_len=514 if flf2v and image_dim else None,
        )
    else:
        raise ConfigError("config.json is neither an official Wan config (dim, num_heads, …) "
                          "nor a diffusers WanTransformer3DModel config (num_attention_heads, …)")
    values.update(overrides)
    return _build(DiTConfig, values, "model").validate()


# ----------------------------------------------------------------------------------------------
# Wan-VAE

WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class VAEConfig:
    """Hyper-parameters of a Wan-VAE (names as diffusers' AutoencoderKLWan config)."""

    name: str = "custom"
    base_dim: int = 96
    decoder_base_dim: Optional[int] = None  # Wan2.2: a wider decoder (256)
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)  # (sic) diffusers' spelling
    is_residual: bool = False  # Wan2.2: residual down / up blocks with parameter-free shortcuts
    in_channels: int = 3  # after patchify: 3 * patch_size ** 2
    out_channels: int = 3
    patch_size: Optional[int] = None  # Wan2.2: 2 (pixels -> channels before the encoder)
    latents_mean: tuple = WAN21_LATENT_MEAN
    latents_std: tuple = WAN21_LATENT_STD
    params_dtype: str = "float32"

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    def validate(self, prefix: str = "vae") -> "VAEConfig":
        def need(ok, field_name, why):
            if not ok:
                raise ConfigError(f"{prefix}.{field_name}: {why}")

        need(len(self.latents_mean) == self.z_dim, "latents_mean", f"has {len(self.latents_mean)} values for z_dim={self.z_dim}")
        need(len(self.latents_std) == self.z_dim, "latents_std", f"has {len(self.latents_std)} values for z_dim={self.z_dim}")
        need(len(self.temperal_downsample) == len(self.dim_mult) - 1, "temperal_downsample",
             f"needs one entry per down-sampling ({len(self.dim_mult) - 1})")
        need(self.params_dtype in DTYPES, "params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        return self


def _tiny_stats(n: int):
    return tuple(round(0.1 * ((i * 7) % 5 - 2), 2) for i in range(n)), tuple(round(1.0 + 0.25 * (i % 4), 2) for i in range(n))


def _wan22_preset() -> dict:
    from megawan.models.vae.wan22_stats import WAN22_LATENT_MEAN, WAN22_LATENT_STD

    return dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, latents_mean=WAN22_LATENT_MEAN, latents_std=WAN22_LATENT_STD)


_VAE_PRESETS = {
    "wan2.1": dict(),
    "tiny-2.1": dict(base_dim=8, z_dim=4, latents_mean=_tiny_stats(4)[0], latents_std=_tiny_stats(4)[1]),
    "tiny-2.2": dict(base_dim=8, decoder_base_dim=12, z_dim=6, is_residual=True, in_channels=12, out_channels=12,
                     patch_size=2, latents_mean=_tiny_stats(6)[0], latents_std=_tiny_stats(6)[1]),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """`vae_preset("wan2.1" | "wan2.2" | "tiny-2.1" | "tiny-2.2")`."""
    presets = dict(_VAE_PRESETS, **{"wan2.2": _wan22_preset()})
    if name not in presets:
        raise ConfigError(f"unknown VAE preset {name!r}{_did_you_mean(name, presets)}")
    return _build(VAEConfig, {"name": name, **presets[name], **overrides}, "vae").validate()


def vae_config_from(config_json: dict, **overrides) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKLWan config.json dict."""
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config_json.items() if k in known}
    values["name"] = "diffusers"
    values.update(overrides)
    return _build(VAEConfig, values, "vae").validate()


# ----------------------------------------------------------------------------------------------
# umT5 text encoder


@dataclass
class TextConfig:
    """umT5 encoder hyper-parameters (transformers' UMT5Config names)."""

    name: str = "custom"
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    text_len: int = 512  # Wan pads / truncates captions to this many tokens
    params_dtype: str = "float32"

    def validate(self, tensor_parallel: int = 1, prefix: str = "text") -> "TextConfig":
        def need(ok, field_name, why):
            if not ok:
                raise ConfigError(f"{prefix}.{field_name}: {why}")

        need(self.params_dtype in DTYPES, "params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        need(self.num_heads % tensor_parallel == 0, "num_heads",
             f"num_heads={self.num_heads} is not divisible by tensor_parallel={tensor_parallel}")
        need(self.d_ff % tensor_parallel == 0, "d_ff", f"d_ff={self.d_ff} is not divisible by tensor_parallel={tensor_parallel}")
        need(self.vocab_size % tensor_parallel == 0, "vocab_size",
             f"vocab_size={self.vocab_size} is not divisible by tensor_parallel={tensor_parallel}")
        return self


_TEXT_PRESETS = {
    "umt5-xxl": dict(),  # Wan's text encoder (models_t5_umt5-xxl-enc-bf16.pth)
    "tiny": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, text_len=24),
}


def text_preset(name: str, **overrides) -> TextConfig:
    """`text_preset("umt5-xxl" | "tiny")`."""
    if name not in _TEXT_PRESETS:
        raise ConfigError(f"unknown text-encoder preset {name!r}{_did_you_mean(name, _TEXT_PRESETS)}")
    return _build(TextConfig, {"name": name, **_TEXT_PRESETS[name], **overrides}, "text").validate()


def text_config_from(config_json: dict, **overrides) -> TextConfig:
    """TextConfig from a transformers UMT5Config dict (config.json)."""
    known = {f.name for f in dataclasses.fields(TextConfig)}
    values = {k: v for k, v in config_json.items() if k in known and k != "name"}
    values["name"] = "transformers"
    values.update(overrides)
    return _build(TextConfig, values, "text").validate()


# ----------------------------------------------------------------------------------------------
# YAML + overrides


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> RunConfig:
    """Read a run config from YAML (or start from defaults) and apply `section.key=value` overrides.

    `model: {preset: NAME, ...}` starts the model section from a preset; other model keys override it.
    """
    raw: dict = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.pop("preset", None)
    if preset is not None:
        if preset not in _PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}{_did_you_mean(preset, _PRESETS)}")
        model_raw = {"name": preset, **_PRESETS[preset], **model_raw}
    raw = {**raw, "model": model_raw}
    return _build(RunConfig, raw, "").validate()


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (YAML-safe) of a config, e.g. to save the resolved config beside a checkpoint."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls, values: dict, prefix: str):
    """Instantiate dataclass `cls` from a dict, rejecting unknown keys and coercing types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown key {where!r}{_did_you_mean(key, known)}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
