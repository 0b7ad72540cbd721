"""The start-of-run summary rank 0 prints before the first step: what is trained, on which layout, with which
batches, for how long, and where its logs and checkpoints go. Everything in it is known before step 1, so a
wrong layout or a too-small store is seen at once rather than in the first checkpoint.

    print(run_banner(cfg, world=8, counts={"81x480x832": 1200}, stride=(4, 8, 8), step=0, log_dir="runs/x/logs"))
"""

from __future__ import annotations

from megawan.config import RunConfig
from megawan.convert.dit_keys import dit_param_count
from megawan.data.buckets import Bucket
from megawan.training.memory import lora_params_per_block


def parameter_counts(cfg: RunConfig) -> tuple:
    """(total parameters of the model, trainable ones): the whole DiT, or with lora.rank > 0 its adapters only."""
    total = dit_param_count(cfg.model)
    trainable = lora_params_per_block(cfg.model, cfg.lora) * cfg.model.num_layers if cfg.lora.enabled else total
    return total, trainable


def _count(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


def run_banner(cfg: RunConfig, world: int, counts: dict, stride: tuple, step: int, log_dir: str) -> str:
    """The summary as lines. counts: samples per bucket trained on (the loader's); stride: the VAE's (t, h, w)."""
    p, d = cfg.parallel, cfg.data
    total, trainable = parameter_counts(cfg)
    lora = f", LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else ""
    vpp = f" VPP{p.virtual_pipeline}" if p.virtual_pipeline else ""
    cp = f" ({p.context_parallel_mode})" if p.context_parallel > 1 else ""
    image_batch = d.image_global_batch_size or d.global_batch_size
    pt, ph, pw = cfg.model.patch_size
    buckets = []
    for name, n in sorted(counts.items()):
        lt, lh, lw = Bucket.from_name(name).latent_shape(stride)
        per_sample = (lt // pt) * (lh // ph) * (lw // pw)
        batch = image_batch if Bucket.from_name(name).is_image else d.global_batch_size
        buckets.append(f"{name}: {n} samples, {per_sample:,} tokens/sample, {per_sample * batch:,} tokens/step")
    start = f"resuming at step {step} of {cfg.train.steps}" if step else f"{cfg.train.steps} steps"
    lines = [
        f"model {cfg.model.name} ({cfg.model.model_type}): {_count(total)} parameters, {_count(trainable)} trainable"
        f"{lora}; {cfg.train.precision}" + (f", fp8 {cfg.train.fp8}" if cfg.train.fp8 else ""),
        f"layout: world {world} = TP{p.tensor_parallel} x PP{p.pipeline_parallel} x CP{p.context_parallel}{cp} x "
        f"DP{p.data_parallel(world)}; SP {'on' if p.sequence_parallel else 'off'}{vpp}; recompute {p.recompute}",
        f"batch: micro {d.micro_batch_size}, global {d.global_batch_size}"
        + (f" (video), {image_batch} (image)" if any(Bucket.from_name(b).is_image for b in counts) else ""),
        *(f"  {b}" for b in buckets),
        f"steps: {start}; checkpoint every {cfg.checkpoint.every} into {cfg.checkpoint.dir}",
        f"logs: {log_dir}",
    ]
    return "\n".join(f"[megawan] {line}" for line in lines)
