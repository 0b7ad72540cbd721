"""One run's config: the sections (parallel layout, data, optimizer, train, checkpoint, logging, validation, lora),
`RunConfig` and its cross-section checks, and reading it from YAML with `section.key=value` overrides.

One config per run. Every field has a default; an unknown key is an error that names the key (and the nearest
known one); impossible values are rejected by `validate()` before any rank starts, with a message naming the field.

    cfg = load_config("examples/configs/tiny_tp2.yaml", ["model.num_layers=4", "parallel.tensor_parallel=2"])
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megawan.config.dit import DIT_PRESETS, DiTConfig
from megawan.config.fields import ConfigError, build, checker, did_you_mean
from megawan.config.lora import LoRAConfig
from megawan.config.te_limits import te_layout_problem

CP_MODES = ("ulysses", "ring", "2d")
# Wan2.2 TI2V trains both of its modes by default. DiffSynth-Studio and FastVideo train one mode per run (with or
# without the first frame); half and half keeps the text-to-video ability while teaching image-to-video.
DEFAULT_I2V_RATIO = 0.5


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
    # Data-parallel communication hidden behind compute (megatron-core's DDP and distributed optimizer; Megatron-LM's
    # --overlap-grad-reduce, --overlap-param-gather, --ddp-bucket-size). Unset (null): on where CUDA is, off on CPU.
    overlap_grad_reduce: Optional[bool] = None  # reduce-scatter each gradient bucket as soon as its backward is done
    overlap_param_gather: Optional[bool] = None  # all-gather the updated weights bucket by bucket in the next forward
    ddp_bucket_size: Optional[int] = None  # parameters per gradient bucket; null: megatron's max(40M, 1M x DP)

    def validate(self, world_size: Optional[int] = None, prefix: str = "parallel") -> "ParallelConfig":
        need = checker(prefix)

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
        # megatron's rule: without the grad-reduce overlap the gradients form one bucket, so the next forward
        # would wait for the whole all-gather at its first layer
        need(not (self.overlap_param_gather and self.overlap_grad_reduce is False), "overlap_param_gather",
             "needs parallel.overlap_grad_reduce (true, or unset for on where CUDA is)")
        need(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1, "ddp_bucket_size",
             f"must be >= 1 parameters, or null for megatron's default; got {self.ddp_bucket_size}")
        need(self.ddp_bucket_size is None or self.overlap_grad_reduce is not False, "ddp_bucket_size",
             "buckets are only formed with parallel.overlap_grad_reduce (it is false)")
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

    @property
    def hierarchical_context_parallel_sizes(self) -> Optional[list]:
        """2d: [ulysses_size, ring size], megatron's hierarchical CP groups (TE's a2a+p2p takes them)."""
        if self.context_parallel == 1 or self.context_parallel_mode != "2d":
            return None
        return [self.ulysses_size, self.context_parallel // self.ulysses_size]

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
        need = checker(prefix)
        need(0.0 <= self.video_ratio <= 1.0, "video_ratio", f"{self.video_ratio} is not within [0, 1]")
        for name in ("global_batch_size", "micro_batch_size"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.image_global_batch_size is None or self.image_global_batch_size >= 1, "image_global_batch_size",
             "must be at least 1")
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
        need = checker(prefix)
        need(self.decay in ("constant", "cosine", "linear"), "decay", f"{self.decay!r} is not constant, cosine or linear")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, "lr / min_lr",
             f"need 0 <= min_lr <= lr and lr > 0, got {self.lr}, {self.min_lr}")
        return self


@dataclass
class TrainConfig:
    """The training loop: length, precision, flow-matching settings, EMA, failure handling."""

    steps: int = 1000
    precision: str = "bf16"  # bf16 (fp32 main weights in the optimizer) | fp32
    fp8: Optional[str] = None  # delayed | current scaling (Transformer Engine, or plain torch FP8 on the local backend)
    fp8_amax_history: int = 1024  # delayed scaling: amaxes kept per tensor, the scale from their max (TE's default)
    fp8_attention: bool = False  # self-attention in FP8 too (TE's fp8_dpa; local backend: kernels/fp8_flash_attention.py)
    shift: float = 5.0  # Wan's timestep shift for training
    timestep_distribution: str = "uniform"  # uniform | logit_normal
    expert: Optional[str] = None  # A14B: train the "high" or "low" noise expert on its own timestep range
    ema_decay: float = 0.0  # 0 = no EMA
    max_bad_steps: int = 5  # NaN / inf losses in a row before the run stops
    log_every: int = 1
    memory_budget_gb: Optional[float] = None  # refuse buckets whose estimated step does not fit
    text_dropout: float = 0.0  # probability that a sample trains with zero text states (the null condition CFG uses)
    # Wan2.2 TI2V: probability that a video sample trains as image-to-video (first latent frame clean, out of the
    # loss) rather than text-to-video; images always train as text-to-image. Unset: 0.5 on a ti2v model, and
    # only a ti2v model takes it
    i2v_ratio: Optional[float] = None
    compile: str = "none"  # none | blocks (torch.compile each block: megawan.models.dit.parallelize.apply_compile)

    def validate(self, prefix: str = "train") -> "TrainConfig":
        need = checker(prefix)

        need(self.steps >= 1, "steps", "must be at least 1")
        need(self.precision in ("bf16", "fp32"), "precision", f"{self.precision!r} is not bf16 or fp32")
        need(self.fp8 in (None, "delayed", "current"), "fp8", f"{self.fp8!r} is not delayed or current")
        need(not self.fp8_attention or self.fp8 is not None, "fp8_attention", "needs train.fp8 (delayed or current)")
        need(self.fp8_amax_history >= 1, "fp8_amax_history", f"must be at least 1, got {self.fp8_amax_history}")
        need(self.shift > 0, "shift", "must be positive")
        need(self.timestep_distribution in ("uniform", "logit_normal"), "timestep_distribution",
             f"{self.timestep_distribution!r} is not uniform or logit_normal")
        need(self.expert in (None, "high", "low"), "expert", f"{self.expert!r} is not high or low")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        need(self.max_bad_steps >= 1, "max_bad_steps", "must be at least 1")
        need(0.0 <= self.text_dropout < 1.0, "text_dropout", "must be in [0, 1)")
        need(self.i2v_ratio is None or 0.0 <= self.i2v_ratio <= 1.0, "i2v_ratio", "must be in [0, 1]")
        need(self.compile in ("none", "blocks"), "compile", f"{self.compile!r} is not none or blocks")
        return self


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 100  # steps between checkpoints (also written on SIGTERM / SIGUSR1 and at the end)
    keep: int = 3  # the newest K complete checkpoints are kept
    init_from: Optional[str] = None  # warm start: weights only, from a checkpoint of an earlier stage
    on_corrupt: str = "fallback"  # a damaged checkpoint at resume: fallback (to the newest intact one) | fail
    # write checkpoints in the background while training continues (megatron-core's async dist_checkpointing);
    # `latest` moves once every rank has written and recorded its files. Off by default, as in Megatron-LM
    # (--async-save): it holds a host copy of the rank's state while writing and forks a writer process
    async_save: bool = False


@dataclass
class LoggingConfig:
    """Where a run's numbers and pictures go: metrics.jsonl always; TensorBoard events and Weights & Biases when
    asked for (megawan.training.metrics.MetricsLogger). W&B's run id is kept in <checkpoint.dir>/wandb_run_id,
    so a requeued or restarted job continues the same W&B run."""

    dir: Optional[str] = None  # metrics.jsonl, TensorBoard events, W&B files (default: <checkpoint.dir>/logs)
    tensorboard: Any = "auto"  # auto (on when tensorboard is installed) | true | false
    wandb_project: Optional[str] = None  # set = log to W&B (WANDB_MODE=offline works: `wandb sync` later)
    wandb_entity: Optional[str] = None  # W&B team or user (default: the logged-in account's)
    wandb_run_name: Optional[str] = None  # the run's display name (default: W&B picks one)
    progress: bool = True

    def validate(self, prefix: str = "logging") -> "LoggingConfig":
        need = checker(prefix)
        need(isinstance(self.tensorboard, bool) or self.tensorboard == "auto", "tensorboard",
             f"{self.tensorboard!r} is not auto | true | false")
        need(self.tensorboard is not True or tensorboard_installed(), "tensorboard",
             "true, but tensorboard is not installed: pip install megawan[logging] (or logging.tensorboard=auto)")
        need(not self.wandb_project or wandb_installed(), "wandb_project",
             "set, but wandb is not installed: pip install megawan[wandb]")
        return self

    def tensorboard_on(self) -> bool:
        """Whether this run writes TensorBoard events: true, or auto with tensorboard installed."""
        return self.tensorboard is True or (self.tensorboard == "auto" and tensorboard_installed())


def tensorboard_installed() -> bool:
    """torch.utils.tensorboard needs the tensorboard package; looked up without importing it (fast)."""
    return importlib.util.find_spec("tensorboard") is not None


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


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
    vae: Optional[str] = None  # VAE weights for decoding (any layout megawan.artifacts reads); None = no videos
    vae_config: Optional[str] = None  # its preset; default: the store's
    fps: int = 16
    seed: int = 1234

    def validate(self, prefix: str = "validation") -> "ValidationConfig":
        need = checker(prefix)

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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seed: int = 0

    def validate(self, world_size: Optional[int] = None) -> "RunConfig":
        p = self.parallel.validate(world_size)
        self.model.validate(tensor_parallel=p.tensor_parallel)
        self.data.validate()
        self.optimizer.validate()
        self.train.validate()
        self.validation.validate()
        self.logging.validate()
        self.lora.validate()
        if self.lora.enabled and not self.checkpoint.init_from:
            raise ConfigError("lora.rank: LoRA trains adapters on frozen base weights: set checkpoint.init_from to "
                              "them (a megawan checkpoint, e.g. a release converted by tools/convert_checkpoint.py)")
        if self.train.expert is not None and self.model.expert_boundary is None:
            raise ConfigError(f"train.expert: {self.model.name} has no experts (model.expert_boundary is unset)")
        if self.model.model_type == "ti2v" and self.train.i2v_ratio is None:
            self.train.i2v_ratio = DEFAULT_I2V_RATIO  # resolved here, so the run's saved config.yaml records it
        elif self.model.model_type != "ti2v" and self.train.i2v_ratio is not None:
            raise ConfigError(f"train.i2v_ratio: only a Wan2.2 TI2V model (model_type ti2v) mixes text-to-video and "
                              f"image-to-video samples; {self.model.name} is {self.model.model_type}: remove it")
        if self.checkpoint.every < 1 or self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.every / checkpoint.keep: must be at least 1")
        if not isinstance(self.checkpoint.async_save, bool):
            raise ConfigError(f"checkpoint.async_save: {self.checkpoint.async_save!r} is not true | false")
        if self.checkpoint.on_corrupt not in ("fallback", "fail"):
            raise ConfigError(f"checkpoint.on_corrupt: {self.checkpoint.on_corrupt!r} is not fallback | fail")
        heads_split = p.tensor_parallel * p.ulysses_degree
        if self.model.num_heads % heads_split:
            raise ConfigError(
                f"model.num_heads: {self.model.num_heads} heads do not split over tensor_parallel x ulysses "
                f"context parallel = {heads_split} ranks (use context_parallel_mode=ring or fewer ranks)")
        if self.model.backend == "te":  # (auto decides in preflight, where it knows what TE can take)
            problem = te_layout_problem(self.model.head_dim, p)
            if problem:
                raise ConfigError(f"{problem}; model.backend=local runs this layout")
        if self.model.num_layers % (p.pipeline_parallel * (p.virtual_pipeline or 1)):
            raise ConfigError(
                f"model.num_layers: {self.model.num_layers} blocks do not split into pipeline_parallel x "
                f"virtual_pipeline = {p.pipeline_parallel * (p.virtual_pipeline or 1)} stages")
        chunk_blocks = self.model.num_layers // (p.pipeline_parallel * (p.virtual_pipeline or 1))
        if p.offload_blocks > chunk_blocks:
            raise ConfigError(f"parallel.offload_blocks: {p.offload_blocks} is more than the {chunk_blocks} blocks "
                              "of a model chunk")
        return self


def read_raw_config(path: Optional[str] = None, overrides: tuple = ()) -> dict:
    """The sections of a YAML config file (or none) with `section.key=value` overrides applied: what load_config
    and megawan.config.vae_run.load_vae_config build their dataclasses from."""
    raw: dict = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:  # a missing file: the commands print "PATH: No such file ..."
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
    return raw


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> RunConfig:
    """Read a run config from YAML (or start from defaults) and apply `section.key=value` overrides.

    `model: {preset: NAME, ...}` starts the model section from a preset; other model keys override it.
    """
    raw = read_raw_config(path, overrides)
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.pop("preset", None)
    if preset is not None:
        if preset not in DIT_PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}{did_you_mean(preset, DIT_PRESETS)}")
        model_raw = {"name": preset, **DIT_PRESETS[preset], **model_raw}
    raw = {**raw, "model": model_raw}
    return build(RunConfig, raw, "").validate()
