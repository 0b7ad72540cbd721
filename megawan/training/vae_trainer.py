"""The VAE training job: `megawan train-vae --config vae.yaml [key=value ...]` under torchrun / srun.

    cfg = load_vae_config("examples/configs/vae/stage2_clips.yaml", ["train.steps=100"])
    facts = preflight_vae(cfg, world_size)     # every check that needs no process group (vae_preflight)
    VAETrainer(cfg, facts).run()               # or train_vae(config_path, overrides)

The same machinery as `megawan train` (megawan.training.trainer): data parallelism with megatron's DDP and
distributed optimizer (fp32 main weights and Adam moments sharded over DP; a Wan-VAE is small, its memory is
activations: train.recompute), THE checkpoint format (atomic, `latest`, checksums, exact resume with the
loader position; reshardable over DP), SIGTERM / SIGUSR1 stop with a checkpoint, metrics.jsonl / TensorBoard
/ W&B, the progress bar. Checkpoint tensors: `vae.<WanVAE key>` (EMA: `ema.vae.<key>`), and in a GAN run
`discriminator.<key>`. The discriminator has its own AdamW (loss.disc_lr, loss.disc_betas); the two optimizers
are saved as one through megatron's ChainedOptimizer, which prefixes each one's state (`chained_<i>.`). The
discriminator's optimizer is given megatron's placeholder state at the start (one zero-gradient step, which
leaves the weights as they are), so a checkpoint taken before loss.gan_start holds it too.

Data: megawan.data.pixel_loader.PixelLoader (clips decoded on the fly, one bucket per step, each DP rank its
slice of the global batch). One step: megawan.training.vae_steps.VAEStep.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megawan.capabilities import rank_device
from megawan.checkpoint import CheckpointSaver, load_checkpoint, read_trainer_state, resume_checkpoint
from megawan.checkpoint_integrity import CheckpointError
from megawan.config.vae_run import VAERunConfig, load_vae_config, vae_run_config_dict
from megawan.models.vae import WanVAE
from megawan.models.vae.discriminator import Discriminator3D
from megawan.models.vae.inflate import freeze_earlier_time_taps
from megawan.parallel import initialize
from megawan.parallel.cpu_compat import megatron_cpu_mode
from megawan.training.ema import EMA
from megawan.training.metrics import MetricsLogger
from megawan.training.optimizer import Overlap, build_optimizer, finish_param_gather, wrap_data_parallel
from megawan.training.trainer import TrainingError, _memory_gb, _restart_note, _Signals
from megawan.training.vae_module import TrainableDiscriminator, TrainableVAE
from megawan.training.vae_preflight import preflight_vae
from megawan.training.vae_steps import VAEStep
from megawan.training.write_queue import tie_checkpoint_writer_to_this_process
from megawan.utils.progress import Progress, write as write_line


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


class SeparateOptimizers(ChainedOptimizer):
    """The VAE's and the discriminator's optimizers as one for the checkpoint: megatron's ChainedOptimizer saves
    and loads each part under its own `chained_<i>.` prefix. Two of its assumptions do not hold here and are
    dropped: one OptimizerConfig for all parts (the discriminator has its own lr and betas) and one Adam step
    count for all (the discriminator starts at loss.gan_start): each part keeps its own. The trainer steps the
    parts itself; this object only saves and loads them."""

    def __init__(self, parts: list):
        self.chained_optimizers = parts
        self.config = parts[0].config
        self.model_chunks = [c for p in parts for c in getattr(p, "model_chunks", [])]
        self.is_stub_optimizer = False

    def _synchronize_steps(self):
        return None


def fresh_vae(cfg: VAERunConfig, state: dict | None) -> WanVAE:
    """The VAE a run starts from: init.from's weights, or a fresh initialisation seeded by train.seed
    (init.per_frame: as a per-frame image autoencoder; init.logvar: the posterior log-variance's start)."""
    vcfg = dataclasses.replace(cfg.vae, params_dtype="bfloat16" if cfg.train.precision == "bf16" else "float32")
    with torch.random.fork_rng(devices=[]):  # the same weights on every rank, the global RNG left as it was
        torch.manual_seed(cfg.train.seed)
        vae = WanVAE(dataclasses.replace(vcfg, params_dtype="float32"))
    if state is not None:
        vae.load_state_dict(state)
    else:
        if cfg.init.per_frame:
            from megawan.models.vae.inflate import per_frame_init

            per_frame_init(vae, torch.Generator().manual_seed(cfg.train.seed))
        if cfg.init.logvar is not None:
            with torch.no_grad():
                vae.quant_conv.bias[cfg.vae.z_dim:] = cfg.init.logvar
    vae.vae_config = vcfg
    return vae.to(torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)


class VAETrainer:
    def __init__(self, cfg: VAERunConfig, facts: dict | None = None):
        self.cfg, self.facts = cfg, facts

    # ------------------------------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        if self.facts is None:
            self.facts = preflight_vae(cfg, _world())
        initialize(cfg.parallel, seed=cfg.train.seed)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._log0(f"starting train-vae on {self.world} ranks{_restart_note()}")
        tie_checkpoint_writer_to_this_process()
        self.device = rank_device()
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        bf16 = cfg.train.precision == "bf16"
        vae = fresh_vae(cfg, self.facts.get("init_state"))
        if cfg.init.freeze_encoder:  # decoder-only: the latents of existing stores stay valid
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
        if cfg.init.freeze_time_taps:
            freeze_earlier_time_taps(vae)  # hooks on the weights: before megatron's DDP copies the grads out
        overlap = Overlap.resolve(cfg.parallel)
        self.chunks = [TrainableVAE(vae.to(self.device))]
        self.vae_ddp = wrap_data_parallel(self.chunks[:1], distributed_optimizer=True, overlap=overlap)
        o = cfg.optimizer
        vae_opt = build_optimizer(self.vae_ddp, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                                  betas=tuple(o.betas), eps=o.eps, bf16=bf16, min_lr=o.min_lr)
        self.vae_opt, self.disc_opt, self.disc_ddp = vae_opt, None, [None]
        if cfg.gan:
            disc = Discriminator3D(channels=3, base=cfg.loss.disc_base, layers=cfg.loss.disc_layers)
            disc.reset_parameters(torch.Generator().manual_seed(cfg.train.seed + 1))
            self.chunks.append(TrainableDiscriminator(disc.to(self.device, self.dtype)))
            self.disc_ddp = wrap_data_parallel(self.chunks[1:], distributed_optimizer=True, overlap=overlap)
            self.disc_opt = build_optimizer(self.disc_ddp, lr=cfg.loss.disc_lr, clip_grad=o.clip_grad,
                                            betas=tuple(cfg.loss.disc_betas), eps=o.eps, bf16=bf16)
            for part in _parts(self.disc_opt):  # state to save before loss.gan_start (weights unchanged)
                if hasattr(part, "_init_optimizer_states_with_dummy_values") and not part.optimizer.state:
                    part._init_optimizer_states_with_dummy_values()
            self.optimizer = SeparateOptimizers(_parts(vae_opt) + _parts(self.disc_opt))
        else:
            self.optimizer = vae_opt
        decay_steps = o.decay_steps or cfg.train.steps
        self.scheduler = OptimizerParamScheduler(
            vae_opt, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(decay_steps, o.warmup_steps + 1),
            lr_decay_style=o.decay, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(decay_steps, 1), wd_incr_style="constant")
        self.ema = EMA(self.chunks[:1], cfg.train.ema_decay, vae_opt, skip_frozen=True) \
            if cfg.train.ema_decay > 0 else None
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        lpips = None
        if cfg.loss.lpips > 0 or (cfg.validation.every and cfg.loss.lpips_vgg and cfg.loss.lpips_lin):
            from megawan.models.vae.lpips import LPIPS  # helper network: VGG16 features + the LPIPS heads

            lpips = LPIPS.from_files(cfg.loss.lpips_vgg, cfg.loss.lpips_lin,
                                     fields=("loss.lpips_vgg", "loss.lpips_lin")).to(self.device)
        self.lpips = lpips
        from megawan.data.pixel_loader import PixelLoader  # the pixel data path (decoding on the fly)

        d = cfg.data
        self.loader = PixelLoader(d.manifest, buckets=list(self.facts["buckets"]),
                                  global_batch_size=d.global_batch_size,
                                  seed=cfg.train.seed, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                  num_workers=d.num_workers, fps=d.fps, decode=d.decode, random_crop=d.random_crop,
                                  video_ratio=d.video_ratio,
                                  stride=self.facts["stride"], scan_group=ps.get_data_parallel_group(),
                                  report=os.path.join(cfg.checkpoint.dir, "skipped.jsonl"))  # rank 0 writes the
        # scan's verdicts, every rank the files that fail on it later
        self.stepper = VAEStep(cfg, self.vae_ddp[0], self.disc_ddp[0], lpips, self.device, self.dtype,
                               ps.get_data_parallel_group(), self.dp_size)
        self.step, self.bad_in_row, self.skipped_steps, self.consumed = 0, 0, 0, 0

    # ------------------------------------------------------------------------------------------
    def _resume(self):
        cfg = self.cfg
        try:
            latest, notes = resume_checkpoint(cfg.checkpoint.dir, cfg.checkpoint.on_corrupt)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        for note in notes:
            self._log0(note)
        if latest is None:
            return
        saved = read_trainer_state(latest)
        if saved.get("gan") != cfg.gan:
            raise TrainingError(f"loss.gan: {latest} was trained {'with' if saved.get('gan') else 'without'} a "
                                "discriminator; resume it with the same loss.gan, or start a new run (init.from)")
        state = load_checkpoint(latest, self.chunks, self.optimizer, self.ema)
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.bad_in_row, self.consumed = state["bad_in_row"], state["consumed_samples"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self._log0(f"resumed from {latest} at step {self.step}")

    def _save(self):
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row,
                 "consumed_samples": self.consumed, "scheduler": self.scheduler.state_dict(),
                 "loader": self.loader.state_dict(), "seed": self.cfg.train.seed, "gan": self.cfg.gan,
                 "rng": "posterior noise is drawn from (seed, step, sample index): no state to keep",
                 "layout": {"world": self.world, "data_parallel": self.dp_size}}
        return self.saver.save(self.cfg.checkpoint.dir, self.step, self.chunks, self.optimizer, state,
                               vae_run_config_dict(self.cfg), ema=self.ema, keep=self.cfg.checkpoint.keep)

    def _log0(self, message: str):
        if self.rank == 0:
            write_line(f"[megawan] {message}")

    def _banner(self, log_dir: str) -> str:
        cfg = self.cfg
        n_vae = sum(p.numel() for p in self.chunks[0].parameters())
        n_train = sum(p.numel() for p in self.chunks[0].parameters() if p.requires_grad)
        disc = f", discriminator {sum(p.numel() for p in self.chunks[1].parameters()):,} params from step " \
               f"{cfg.loss.gan_start}" if cfg.gan else ""
        return (f"[megawan] train-vae {cfg.vae.name}: {n_vae:,} params ({n_train:,} trained){disc}; "
                f"{self.world} ranks (data parallel), {cfg.train.precision}, buckets {', '.join(self.facts['buckets'])}"
                f", global batch {cfg.data.global_batch_size}; steps {self.step}->{cfg.train.steps}; "
                f"checkpoints {cfg.checkpoint.dir}; logs {log_dir}")

    # ------------------------------------------------------------------------------------------
    def _train_step(self, batch: dict) -> dict:
        cfg = self.cfg
        gan_on = cfg.gan and self.step >= cfg.loss.gan_start
        self.vae_opt.zero_grad()
        if self.disc_opt is not None:
            self.disc_opt.zero_grad()
        parts = self.stepper.run(batch, self.step, gan_on)
        grad_norm, lr = None, self.vae_opt.param_groups[0]["lr"]
        if math.isfinite(parts["loss"]):
            stepped, grad_norm, _ = self.vae_opt.step()
            self.scheduler.step(increment=1)
            if stepped and self.ema is not None:
                self.ema.update()
            if gan_on:
                _, disc_norm, _ = self.disc_opt.step()
                parts["disc_grad_norm"] = None if disc_norm is None else float(disc_norm)
        parts.update({"grad_norm": None if grad_norm is None else float(grad_norm), "lr": lr})
        return parts

    def run(self) -> dict:
        cfg = self.cfg
        signals = _Signals()
        self.saver = CheckpointSaver(async_save=cfg.checkpoint.async_save)
        with megatron_cpu_mode():
            self._setup()
            self._resume()
            log_dir = cfg.logging.dir or os.path.join(cfg.checkpoint.dir, "logs")
            metrics = MetricsLogger.for_run(cfg, log_dir, enabled=self.rank == 0, step=self.step,
                                            as_dict=vae_run_config_dict)
            self._log0(metrics.summary)
            validator = None
            if cfg.validation.every:
                from megawan.training.vae_validation import VAEValidator

                validator = VAEValidator(cfg, self.chunks[0].vae, self.lpips, self.device, self.dtype,
                                         self.facts["stride"], os.path.join(log_dir, "validation"))
            if self.rank == 0:
                write_line(self._banner(log_dir))
            bar = Progress(cfg.train.steps, desc="train-vae", unit="steps",
                           enabled=self.rank == 0 and cfg.logging.progress, initial=self.step)
            it = iter(self.loader)
            last_saved, stop_reason, val = self.step, None, {}
            try:
                while self.step < cfg.train.steps:
                    start = time.perf_counter()
                    batch = next(it)
                    out = self._train_step(batch)
                    seconds = time.perf_counter() - start
                    self.step += 1
                    samples = int(batch.get("global_samples", cfg.data.global_batch_size))
                    self.consumed += samples
                    if math.isfinite(out["loss"]):
                        self.bad_in_row = 0
                    else:
                        self.bad_in_row += 1
                        self.skipped_steps += 1
                        self._log0(f"step {self.step}: loss is {out['loss']}; step skipped")
                        if self.bad_in_row >= cfg.train.max_bad_steps:
                            raise TrainingError(f"{self.bad_in_row} steps in a row had a non-finite loss (last: step "
                                                f"{self.step}); stopping. Lower optimizer.lr or check the data")
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        mse = out.pop("mse")
                        values = {**out, "psnr": 10 * math.log10(4.0 / mse) if mse > 0 else None,
                                  "samples_per_s": samples / seconds, "step_seconds": seconds,
                                  "bucket": batch["bucket"], "epoch": batch.get("epoch"),
                                  "consumed_samples": self.consumed, "skipped_steps": self.skipped_steps,
                                  "memory_gb": _memory_gb()}
                        metrics.write(self.step, values)
                        bar.update(self.step - bar.count, loss=f"{out['loss']:.4f}", bucket=batch["bucket"])
                    self.saver.finalize()
                    flag = torch.tensor([1 if signals.received else 0], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item():
                        stop_reason = f"signal {signals.received or 'on another rank'}"
                    if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps or stop_reason:
                        finish_param_gather(self.vae_ddp + [d for d in self.disc_ddp if d is not None])
                        path = self._save()
                        last_saved = self.step
                        self._log0(f"checkpoint {path}")
                    if validator is not None and self.step % cfg.validation.every == 0 and not stop_reason:
                        finish_param_gather(self.vae_ddp)
                        if self.ema is not None:
                            self.ema.apply()
                        try:
                            val = validator.run(self.step)
                        finally:
                            if self.ema is not None:
                                self.ema.restore()
                        metrics.write(self.step, val)
                        metrics.log_media(self.step, images=validator.media(self.step))
                        self._log0(f"validation at step {self.step}: PSNR {val['val/psnr']:.2f} dB, "
                                   f"SSIM {val['val/ssim']:.4f}")
                    if stop_reason:
                        self._log0(f"stopping at step {self.step} ({stop_reason}); run the same command to resume")
                        break
                for path in self.saver.finalize(blocking=True):
                    self._log0(f"checkpoint {path} committed")
            except BaseException:
                self.saver.abort()
                raise
            finally:
                bar.close()
                metrics.close()
        return {"step": self.step, "last_saved": last_saved, "stopped": stop_reason, "val": val,
                "skipped_steps": self.skipped_steps}


def train_vae(config_path: str | None, overrides: tuple = ()) -> dict:
    """`megawan train-vae`: load + check the config, then run on this rank (under torchrun / srun, or alone)."""
    cfg = load_vae_config(config_path, overrides)
    facts = preflight_vae(cfg, _world())
    result = VAETrainer(cfg, facts).run()
    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()  # an in-process run (the demo) leaves no groups behind
        dist.destroy_process_group()
    return result
