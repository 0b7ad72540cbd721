"""The training loop: `megawan train --config stage.yaml [key=value ...]` under torchrun / srun, any layout.

    cfg = load_config("examples/configs/tiny_stage1.yaml", ["train.steps=100"])
    preflight(cfg, world_size)       # every check that needs no process group, before any rank starts work
    Trainer(cfg).run()

One step: the loader hands every rank of a model replica the same bucket-homogeneous batch (its DP slice);
latents are normalised with the VAE statistics the store records; each sample's noise and timestep come from
a generator seeded by (seed, step, the sample's place in the global batch), so they do not depend on the
layout and need no saved RNG state; megatron's schedule runs the micro-batches (PP / VP, CP, TP, SP);
the loss is sum(weight * per-sample MSE) / global samples, so padded copies count for nothing; megatron's
distributed optimizer (AdamW, fp32 main weights, clipping) steps under the LR schedule; the EMA follows.
A non-finite loss (known to every rank: it is all-reduced) skips the step and stops the run after
`train.max_bad_steps` in a row. Checkpoints every `checkpoint.every` steps, at the end and on SIGTERM /
SIGUSR1 (Slurm's pre-emption warning): see megawan.checkpoint. With checkpoint.async_save the files are written
in the background while the next steps train; every step commits a finished write (collectively), a new save
first waits for the previous one, and the end of training or a signal's stop waits for the last one.
With lora.rank > 0 the run trains adapters on the frozen base weights of checkpoint.init_from, and its
checkpoints hold the adapters only (megawan.training.lora).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from kernels.dispatch import triton_runnable
from megawan.capabilities import cuda_available, rank_device
from megawan.checkpoint import (LORA_BASE, CheckpointSaver, load_checkpoint, read_trainer_state, resolve_checkpoint,
                                resume_checkpoint)
from megawan.checkpoint_integrity import UNVERIFIED, CheckpointError, verify_checkpoint
from megawan.config import ConfigError, RunConfig, config_to_dict, load_config
from megawan.data.buckets import Bucket
from megawan.data.loader import BucketedLoader
from megawan.data.store import LatentStore
from megawan.diffusion.flow import FlowMatching, trains_image_to_video
from megawan.models.dit.flops import flops
from megawan.models.dit.parallelize import (apply_activation_offload, apply_activation_recompute, apply_compile,
                                           build_model_chunks)
from megawan.parallel import initialize
from megawan.parallel.cpu_compat import megatron_cpu_mode
from megawan.training.backend import TE_MISSING, run_backend, te_usable
from megawan.training.banner import run_banner
from megawan.training.conditioning import check_store as check_conditioning
from megawan.training.conditioning import image_for_model, image_inputs
from megawan.training.ema import EMA
from megawan.training.lora import add_adapters, check_lora, check_resume
from megawan.training.memory import estimate_run_memory
from megawan.training.metrics import MetricsLogger
from megawan.training.optimizer import Overlap, build_optimizer, finish_param_gather, wrap_data_parallel
from megawan.training.precision import fp8_context
from megawan.training.schedule import forward_backward
from megawan.training.validation import Validator
from megawan.training.write_queue import tie_checkpoint_writer_to_this_process
from megawan.utils.progress import Progress, write as write_line
from megawan.utils.user_errors import UserError

logger = logging.getLogger("megawan")


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on for a reason its user can act on (a damaged checkpoint, losses that stay
    non-finite): `megawan train` prints it as one line."""


# ----------------------------------------------------------------------------------------------
# Checks before any process group exists


def preflight(cfg: RunConfig, world_size: int) -> dict:
    """Refuse a run that cannot work, naming the field: layout, backend, store, buckets, shapes, memory. Returns
    facts the trainer reuses: "metadata" (the store's StoreMetadata), "buckets" (the bucket names trained on),
    "backend" (local or te: what model.backend resolves to for this run, megawan.training.backend) and
    "backend_reason" (why auto settled for local where TE is installed, else None)."""
    cfg.validate(world_size)
    if cfg.model.backend == "te" and not te_usable():
        raise ConfigError(TE_MISSING)
    if not cfg.data.store:
        raise ConfigError("data.store: no latent store given (tools/precompute_latents.py makes one)")
    try:
        store = LatentStore.open(cfg.data.store)
        meta = store.metadata
    except (FileNotFoundError, ValueError) as e:  # ValueError: another format version, a field missing
        raise ConfigError(f"data.store: {e}") from None
    buckets = list(cfg.data.buckets) or store.buckets()
    missing = [b for b in buckets if b not in store.buckets()]
    if missing:
        raise ConfigError(f"data.buckets: {missing} are not in {cfg.data.store} (it has {store.buckets()})")
    empty = [b for b in buckets if store.count(b) == 0]
    if empty:
        raise ConfigError(f"data.buckets: {empty} hold no samples in {cfg.data.store}")
    check_conditioning(cfg, meta)  # i2v: the store's image conditioning fits the model's channels and CLIP width
    if cfg.model.model_type != "i2v" and meta.vae.z_dim != cfg.model.in_dim:
        raise ConfigError(f"model.in_dim: {cfg.model.in_dim} input channels, but the store's latents have "
                          f"z_dim={meta.vae.z_dim}")
    if meta.vae.z_dim != cfg.model.out_dim:  # the flow-matching target (noise - latents) has z_dim channels
        raise ConfigError(f"model.out_dim: {cfg.model.out_dim} output channels, but the store's latents have "
                          f"z_dim={meta.vae.z_dim}")
    text = meta.text_encoder
    if text.dim != cfg.model.text_dim:
        raise ConfigError(f"model.text_dim: {cfg.model.text_dim}, but the store's text states have dim={text.dim}")
    if text.max_length > cfg.model.text_len:
        raise ConfigError(f"model.text_len: {cfg.model.text_len} tokens, but the store's text states are "
                          f"{text.max_length} long")
    shapes = {b: Bucket.from_name(b) for b in buckets}
    has = {"video": any(not s.is_image for s in shapes.values()), "image": any(s.is_image for s in shapes.values())}
    if cfg.data.video_ratio > 0 and not has["video"]:
        raise ConfigError(f"data.video_ratio: {cfg.data.video_ratio} asks for video, but the buckets {buckets} are images")
    if cfg.data.video_ratio < 1 and not has["image"]:
        raise ConfigError(f"data.video_ratio: {cfg.data.video_ratio} asks for images, but the buckets {buckets} are videos")
    pt, ph, pw = cfg.model.patch_size
    for b in buckets:
        lt, lh, lw = shapes[b].latent_shape(meta.vae.stride)
        if lt % pt or lh % ph or lw % pw:
            raise ConfigError(f"data.buckets: {b} gives latents {lt}x{lh}x{lw}, not divisible by the patch size "
                              f"{cfg.model.patch_size}")
        if cfg.train.memory_budget_gb:
            tokens = _tokens(shapes[b], meta.vae.stride, cfg)
            est = estimate_run_memory(cfg, world_size, tokens)  # a LoRA run: the frozen base has no optimizer state
            if est.total / 2**30 > cfg.train.memory_budget_gb:
                raise ConfigError(
                    f"data.buckets: {b} ({tokens} tokens, micro batch {cfg.data.micro_batch_size}) needs about "
                    f"{est.total / 2**30:.1f} GiB per GPU under this layout, over train.memory_budget_gb="
                    f"{cfg.train.memory_budget_gb:g} (more TP / CP, recompute, or a smaller bucket)")
    sequences = {("data.buckets", b): _tokens(shapes[b], meta.vae.stride, cfg) for b in buckets}
    sequences.update(_preflight_validation(cfg))
    backend, reason = run_backend(cfg, sequences)
    if cfg.train.fp8_attention and backend == "local" and not triton_runnable():
        raise ConfigError("train.fp8_attention: the local backend's FP8 attention is a Triton kernel; it needs "
                          "Triton and a CUDA device (on CPU only Triton's interpreter, TRITON_INTERPRET=1)")
    base = None
    if cfg.checkpoint.init_from:
        try:
            base = resolve_checkpoint(cfg.checkpoint.init_from)
        except (FileNotFoundError, RuntimeError, CheckpointError) as e:
            raise ConfigError(f"checkpoint.init_from: {e}") from None
    check_lora(cfg, base)  # lora.targets, a LoRA checkpoint named as the base, lora.init_from
    return {"metadata": meta, "buckets": buckets, "backend": backend, "backend_reason": reason}


def _tokens(bucket: Bucket, stride, cfg: RunConfig) -> int:
    pt, ph, pw = cfg.model.patch_size
    lt, lh, lw = bucket.latent_shape(stride)
    return (lt // pt) * (lh // ph) * (lw // pw)


def _preflight_validation(cfg: RunConfig) -> dict:
    """Checks of the held-out store; returns its buckets' video token counts, keyed as run_backend reads them."""
    v = cfg.validation
    if not v.every:
        return {}
    try:
        held_out = LatentStore.open(v.store)
        meta = held_out.metadata
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"validation.store: {e}") from None
    z, dim = meta.vae.z_dim, meta.text_encoder.dim
    if z != cfg.model.out_dim:
        raise ConfigError(f"validation.store: its latents have z_dim={z}, the model's are {cfg.model.out_dim} channels")
    check_conditioning(cfg, meta, where="validation.store")  # i2v: held-out conditioning that fits the model
    if dim != cfg.model.text_dim:
        raise ConfigError(f"validation.store: its text states have dim={dim}, the model takes {cfg.model.text_dim}")
    if not held_out.buckets() or not any(held_out.count(b) for b in held_out.buckets()):
        raise ConfigError(f"validation.store: {v.store} holds no samples")
    if v.bucket and v.bucket not in held_out.buckets():
        raise ConfigError(f"validation.bucket: {v.bucket} is not in {v.store} (it has {held_out.buckets()})")
    if v.vae and not os.path.exists(v.vae):
        raise ConfigError(f"validation.vae: {v.vae} does not exist")
    return {("validation.store", b): _tokens(Bucket.from_name(b), meta.vae.stride, cfg) for b in held_out.buckets()}


# ----------------------------------------------------------------------------------------------


def _sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + index)


class _Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the end of the step and leaves."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test harness): no handler
                pass

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg: RunConfig, facts: dict | None = None):
        self.cfg = cfg
        self.facts = facts

    # ------------------------------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        if self.facts is None:
            self.facts = preflight(cfg, world)
        initialize(cfg.parallel, seed=cfg.seed)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._log0(f"starting on {self.world} ranks{_restart_note()}")
        tie_checkpoint_writer_to_this_process()  # no orphans if this rank is killed (torchrun restarts the group)
        if self.facts.get("backend_reason"):
            self._log0(self.facts["backend_reason"])
        self.device = rank_device()
        model_cfg = cfg.model
        if cfg.train.precision == "bf16":
            model_cfg = dataclasses.replace(model_cfg, params_dtype="bfloat16")
        self.backend = self.facts["backend"]  # preflight's choice: auto may settle for local (reason logged)
        model_cfg = dataclasses.replace(model_cfg, backend=self.backend)
        self.model_cfg = model_cfg
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        # built where they run: on CUDA megatron initialises each shard on this rank's GPU, no host copy first
        self.chunks = build_model_chunks(model_cfg, cfg.parallel, device=self.device)
        self.lora_base = None  # a LoRA run: {"path", "fingerprint"} of the frozen base, saved with every checkpoint
        if cfg.lora.enabled:  # the base weights, then the adapters: before recompute wraps the blocks and DDP
            self.lora_base = add_adapters(self.chunks, resolve_checkpoint(cfg.checkpoint.init_from), cfg.lora)
            self._log0(f"LoRA rank {cfg.lora.rank} on the frozen base {self.lora_base['path']}")
        if cfg.train.compile != "none":  # first: recompute and offload then wrap the compiled forwards
            for chunk in self.chunks:
                apply_compile(chunk, cfg.train.compile)
        if cfg.parallel.recompute != "none":
            for chunk in self.chunks:
                apply_activation_recompute(chunk, cfg.parallel.recompute, cfg.parallel.recompute_every)
        if cfg.parallel.offload_blocks:
            for chunk in self.chunks:
                apply_activation_offload(chunk, cfg.parallel.offload_blocks)
        self.ddp = wrap_data_parallel(self.chunks, distributed_optimizer=True, overlap=Overlap.resolve(cfg.parallel))
        o = cfg.optimizer
        self.optimizer = build_optimizer(self.ddp, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                                         betas=tuple(o.betas), eps=o.eps, bf16=cfg.train.precision == "bf16",
                                         min_lr=o.min_lr)
        decay_steps = o.decay_steps or cfg.train.steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(decay_steps, o.warmup_steps + 1),
            lr_decay_style=o.decay, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(decay_steps, 1), wd_incr_style="constant")
        self.ema = (EMA(self.chunks, cfg.train.ema_decay, self.optimizer, skip_frozen=cfg.lora.enabled)
                    if cfg.train.ema_decay > 0 else None)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        d = cfg.data
        sizes = {"video": d.global_batch_size, "image": d.image_global_batch_size or d.global_batch_size}
        self.loader = BucketedLoader(d.store, sizes, video_ratio=d.video_ratio, seed=cfg.seed,
                                     dp_rank=self.dp_rank, dp_size=self.dp_size, buckets=self.facts["buckets"],
                                     num_workers=d.num_workers)
        vae = self.facts["metadata"].vae
        self.latents_mean, self.latents_std = vae.normalization()
        self.stride = vae.stride
        self.flow = FlowMatching(shift=cfg.train.shift, distribution=cfg.train.timestep_distribution)
        self.step, self.bad_in_row, self.skipped_steps, self.consumed = 0, 0, 0, 0

    # ------------------------------------------------------------------------------------------
    def _resume(self):
        cfg = self.cfg
        try:  # every rank checks a share of the files; a damaged one is skipped or stops the run by config
            latest, notes = resume_checkpoint(cfg.checkpoint.dir, cfg.checkpoint.on_corrupt)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        for note in notes:
            self._log0(note)
        if latest is not None:
            check_resume(read_trainer_state(latest), self.lora_base, latest)  # LoRA: the same base as before
            state = load_checkpoint(latest, self.chunks, self.optimizer, self.ema)
            self.step, self.skipped_steps = state["step"], state["skipped_steps"]
            self.bad_in_row, self.consumed = state["bad_in_row"], state["consumed_samples"]
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["loader"])
            self._log0(f"resumed from {latest} at step {self.step}")
        elif cfg.checkpoint.init_from and self.lora_base is None:  # (a LoRA run's base is loaded in _setup)
            source = resolve_checkpoint(cfg.checkpoint.init_from)
            verdict = verify_checkpoint(source, collective=True)  # named by the user: no fallback
            if verdict not in (None, UNVERIFIED):
                raise TrainingError(f"checkpoint.init_from: {source} is damaged: {verdict}")
            load_checkpoint(source, self.chunks)
            self.optimizer.reload_model_params()
            if self.ema is not None:
                self.ema.reset()  # the average starts at the loaded weights
            self._log0(f"warm start from {source} (weights only)")

    def _save(self):
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row,
                 "consumed_samples": self.consumed, "scheduler": self.scheduler.state_dict(),
                 "loader": self.loader.state_dict(), "seed": self.cfg.seed,
                 "rng": "noise and timesteps are drawn from (seed, step, sample index): no state to keep",
                 "layout": {"world": self.world, **config_to_dict(self.cfg.parallel)}}
        if self.lora_base is not None:  # the checkpoint holds the adapters only (megawan.checkpoint)
            state[LORA_BASE] = self.lora_base
        return self.saver.save(self.cfg.checkpoint.dir, self.step, self.chunks, self.optimizer, state,
                               config_to_dict(self.cfg), ema=self.ema, keep=self.cfg.checkpoint.keep)

    def _commit_checkpoints(self, blocking: bool = False):
        """Collective: `latest` moves to the background writes every rank has finished (blocking: waits)."""
        for path in self.saver.finalize(blocking=blocking):
            self._log0(f"checkpoint {path} (committed at step {self.step}; written in the background)")

    def _log0(self, message: str):
        if self.rank == 0:
            write_line(f"[megawan] {message}")  # on its own line, not onto an open progress bar

    # ------------------------------------------------------------------------------------------
    def _timesteps(self, g: torch.Generator) -> torch.Tensor:
        t = self.flow.sample_timesteps(1, generator=g)
        expert, boundary = self.cfg.train.expert, self.cfg.model.expert_boundary
        if expert == "high":  # A14B: each expert learns its own part of the trajectory
            t = boundary + (1 - boundary) * t
        elif expert == "low":
            t = boundary * t
        return t

    def _microbatches(self, batch: dict) -> list:
        """Noised inputs for this rank's slice, cut into micro-batches (padded with weight-0 copies)."""
        cfg = self.cfg
        mbs = cfg.data.micro_batch_size
        latents, text, weight = batch["latents"], batch["text"], batch["weight"]
        n = latents.shape[0]
        pad = -n % mbs
        if pad:
            latents = torch.cat([latents, latents[:1].expand(pad, *latents.shape[1:])])
            text = torch.cat([text, text[:1].expand(pad, *text.shape[1:])])
            weight = torch.cat([weight, torch.zeros(pad)])
        dtype = self.chunks[0].config.params_dtype
        x0 = (latents.float() - self.latents_mean) / self.latents_std
        noises, ts, drop, i2v = [], [], [], []
        ti2v = cfg.model.model_type == "ti2v"
        for i in range(x0.shape[0]):
            g = _sample_generator(cfg.seed, self.step, batch["offset"] + i)
            noises.append(torch.randn(x0.shape[1:], generator=g))
            ts.append(self._timesteps(g))
            if cfg.train.text_dropout > 0 and torch.rand(1, generator=g).item() < cfg.train.text_dropout:
                text = text.clone() if not drop else text
                drop.append(i)
            if ti2v:  # Wan2.2 TI2V: this sample's mode, image-to-video at train.i2v_ratio (never for an image)
                i2v.append(trains_image_to_video(g, cfg.train.i2v_ratio, x0.shape[2]))
        noise, t = torch.stack(noises), torch.cat(ts)
        if drop:  # the null condition: zero text states (what validation / generation pass as unconditional)
            text[drop] = 0
        if ti2v:  # image-to-video samples keep the first latent frame clean, out of the loss; per-token timesteps
            x_t, target, timestep, mask = self.flow.clean_first_frame(x0, noise, t, cfg.model.patch_size,
                                                                      torch.tensor(i2v))
        else:
            x_t, target = self.flow.noised(x0, noise, t)
            timestep, mask = self.flow.model_timesteps(t), None
        text = text.to(dtype)
        condition, image = image_inputs(batch, cfg.model, x0.shape[0], self.latents_mean, self.latents_std)
        if condition is not None:  # i2v: the model sees [x_t, mask, conditioning latents]; the target stays x_t's
            x_t = torch.cat([x_t, condition], dim=1)
        micro = []
        for s in range(0, x0.shape[0], mbs):
            sl = slice(s, s + mbs)
            micro.append({"x_t": x_t[sl].to(self.device, dtype), "timestep": timestep[sl].to(self.device),
                          "text": text[sl].to(self.device), "target": target[sl].to(self.device),
                          "weight": weight[sl].to(self.device),
                          "mask": None if mask is None else mask[sl].to(self.device),
                          "image": image_for_model(image, sl, cfg.model, self.device, dtype)})
        return micro

    def _forward_step(self, scale: float):
        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            with fp8_context(self.cfg.train.fp8, self.backend, self.cfg.train.fp8_attention,
                             self.cfg.train.fp8_amax_history):
                output = model(mb["x_t"], mb["timestep"], mb["text"], image=mb["image"])

            def loss_fn(prediction):
                per_sample = FlowMatching.per_sample_loss(prediction, mb["target"], mb["mask"])
                weighted = (per_sample * mb["weight"]).sum()
                return weighted * scale, {"weighted_sum": weighted.detach().clone()}

            return output, loss_fn

        return forward_step

    def _train_step(self, batch: dict) -> dict:
        micro = self._microbatches(batch)
        pt, ph, pw = self.cfg.model.patch_size
        lt, lh, lw = Bucket.from_name(batch["bucket"]).latent_shape(self.stride)
        tokens = (lt // pt) * (lh // ph) * (lw // pw)
        # megatron divides each micro-batch's loss by their number and DDP averages over DP: undo both so the
        # gradient is that of sum(weight * loss) / global samples
        scale = len(micro) * self.dp_size / batch["global_samples"]
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(micro) for _ in self.ddp]
        results = forward_backward(self.ddp, self._forward_step(scale), iterators, len(micro), tokens,
                                   self.cfg.data.micro_batch_size)
        # the global loss, known to every rank: one contribution per replica (last stage, TP and CP rank 0)
        contributes = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
                       and ps.get_context_parallel_rank() == 0)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        for r in (results if contributes else ()):
            total += r["weighted_sum"].double()
        dist.all_reduce(total)
        loss = total.item() / batch["global_samples"]  # a host sync the finite check needs
        grad_norm, lr = None, self.optimizer.param_groups[0]["lr"]
        if math.isfinite(loss):
            stepped, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            if stepped and self.ema is not None:  # an update the optimizer skipped is not averaged in
                # (the EMA reads the optimizer's fp32 main-weight shards, not the model weights: the parameter
                # all-gather the step started stays overlapped with the next forward)
                self.ema.update()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "latent": (lt, lh, lw)}

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        signals = _Signals()
        self.saver = CheckpointSaver(async_save=cfg.checkpoint.async_save)
        with megatron_cpu_mode():
            self._setup()
            self._resume()
            log_dir = cfg.logging.dir or os.path.join(cfg.checkpoint.dir, "logs")
            metrics = MetricsLogger.for_run(cfg, log_dir, enabled=self.rank == 0, step=self.step)
            self._log0(metrics.summary)  # which trackers are on and where they write
            validator = None
            if cfg.validation.every:
                validator = Validator(cfg.validation, self.ddp, model=cfg.model,
                                      micro_batch_size=cfg.data.micro_batch_size,
                                      device=self.device, dtype=self.dtype,
                                      normalization=(self.latents_mean, self.latents_std),
                                      ema=self.ema, out_dir=os.path.join(log_dir, "validation"))
            if self.rank == 0:  # what runs on which layout, where it writes (megawan.training.banner)
                write_line(run_banner(cfg, self.world, self.loader.plan.counts, self.stride, self.step, log_dir))
            bar = Progress(cfg.train.steps, desc="train", unit="steps", enabled=self.rank == 0 and cfg.logging.progress,
                           initial=self.step)  # a resumed run's rate and ETA count the steps run here
            it = iter(self.loader)
            last_saved, stop_reason = self.step, None
            try:
                while self.step < cfg.train.steps:
                    start = time.perf_counter()
                    batch = next(it)
                    out = self._train_step(batch)
                    seconds = time.perf_counter() - start
                    self.step += 1
                    self.consumed += batch["global_samples"]
                    if math.isfinite(out["loss"]):
                        self.bad_in_row = 0
                    else:
                        self.bad_in_row += 1
                        self.skipped_steps += 1
                        self._log0(f"step {self.step}: loss is {out['loss']}; step skipped "
                                   f"({self.bad_in_row} in a row, {self.skipped_steps} in all)")
                        if self.bad_in_row >= cfg.train.max_bad_steps:
                            raise TrainingError(
                                f"{self.bad_in_row} steps in a row had a non-finite loss (last: step {self.step}, "
                                f"bucket {batch['bucket']}); stopping. Check the data (tools/inspect_store.py), "
                                f"lower optimizer.lr or raise train.max_bad_steps")
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        lt, lh, lw = out["latent"]
                        model_flops = 3 * flops(self.model_cfg, batch["global_samples"], lt, lh, lw)
                        values = {"loss": out["loss"], "lr": out["lr"],
                                  "grad_norm": None if out["grad_norm"] is None else float(out["grad_norm"]),
                                  "samples_per_s": batch["global_samples"] / seconds,
                                  "tokens_per_s": batch["global_samples"] * out["tokens"] / seconds,
                                  "tflops_per_gpu": model_flops / seconds / self.world / 1e12,
                                  "step_seconds": seconds, "bucket": batch["bucket"], "epoch": batch["epoch"],
                                  "consumed_samples": self.consumed, "skipped_steps": self.skipped_steps,
                                  "memory_gb": _memory_gb()}
                        metrics.write(self.step, values)
                        bar.update(self.step - bar.count, loss=f"{out['loss']:.4f}", bucket=batch["bucket"])
                    self._commit_checkpoints()  # one all-reduce while a write is in flight, else nothing
                    flag = torch.tensor([1 if signals.received else 0], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank leaves together
                    if flag.item():
                        stop_reason = f"signal {signals.received or 'on another rank'}"
                    if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps or stop_reason:
                        finish_param_gather(self.ddp)  # the checkpoint holds every weight of this step
                        blocked = time.perf_counter()
                        path = self._save()
                        blocked = time.perf_counter() - blocked
                        last_saved = self.step
                        if cfg.checkpoint.async_save:
                            self._log0(f"checkpoint {path}: writing in the background (the step loop waited "
                                       f"{blocked:.2f} s)")
                        else:
                            self._log0(f"checkpoint {path} ({blocked:.2f} s)")
                    if validator is not None and self.step % cfg.validation.every == 0 and not stop_reason:
                        finish_param_gather(self.ddp)  # before the EMA swaps its weights in
                        values = validator.run(self.step)
                        metrics.write(self.step, values)
                        metrics.log_media(self.step, **validator.media(self.step))  # clips + contact sheet
                        self._log0(f"validation at step {self.step}: loss {values['val/loss']:.4f} "
                                   f"({values['val/seconds']:.1f} s)")
                    if stop_reason:
                        self._log0(f"stopping at step {self.step} ({stop_reason}); run the same command to resume")
                        break
                self._commit_checkpoints(blocking=True)  # the end, or a signal's stop: the last write is committed
            except BaseException:
                self.saver.abort()  # no collective after a failure: the write in flight stays a `.tmp`
                raise
            finally:
                bar.close()
                metrics.close()
        return {"step": self.step, "last_saved": last_saved, "skipped_steps": self.skipped_steps,
                "stopped": stop_reason}


def _restart_note() -> str:
    """Under torchrun's elastic agent (`--max-restarts N`): which start of the worker group this is. A restarted
    group resumes from the newest checkpoint; the count says how often the job has lost a worker."""
    count, most = os.environ.get("TORCHELASTIC_RESTART_COUNT"), os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if count is None or most == "0":  # srun, a lone process, or torchrun without restarts
        return ""
    return f" (torchrun restart {count} of at most {most})"


def _memory_gb() -> float:
    if cuda_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def train(config_path: str | None, overrides: tuple = ()) -> dict:
    """`megawan train`: load + check the config, then run on this rank."""
    cfg = load_config(config_path, overrides)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    facts = preflight(cfg, world)
    result = Trainer(cfg, facts).run()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
