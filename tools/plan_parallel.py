#!/usr/bin/env python3
"""List the parallel layouts that fit a Wan model on a number of GPUs, with memory and FLOPs per GPU.

    python tools/plan_parallel.py --preset wan2.1-t2v-14b --frames 81 --height 720 --width 1280 \
        --gpus 64 --gpu-memory-gb 80

Sizes are VIDEO frames / pixels; the VAE stride (4 x 8 x 8, or 4 x 16 x 16 for Wan2.2 TI2V-5B) gives the
latent size. Memory: bf16 weights, fp32 grads, fp32 main weights + Adam moments sharded by the distributed
optimizer over DP x CP, with --ema an fp32 EMA sharded like them (train.ema_decay > 0), activations of the
first pipeline stage with 1F1B (see megawan/training/memory.py).
Selective recompute (attention core only) is not listed: with flash-style attention it frees nothing.
Without recompute, a layout that is short of memory by a few blocks' activations is listed with the fewest
blocks whose activations go to host memory that make it fit (parallel.offload_blocks; copies over PCIe,
preferred to full recompute only when few blocks are offloaded, see --max-offload).
The first layout listed is printed last as `parallel.*=` overrides to paste after `megawan train --config FILE`.

LoRA fine-tuning (--lora-rank R, or --config of a run with a `lora:` section): the base weights stay frozen in
bf16 with no gradients or optimizer state; only the adapters have them (docs/finetuning.md):

    python tools/plan_parallel.py --preset wan2.1-t2v-14b --frames 81 --height 480 --width 832 \
        --gpus 1 --gpu-memory-gb 80 --lora-rank 32
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

from megawan.config import ConfigError, LoRAConfig, ParallelConfig, RunConfig, dit_preset, load_config
from megawan.models.dit import flops
from megawan.models.dit.flops import latent_size as video_latent_size
from megawan.models.dit.flops import tokens as count_tokens
from megawan.training.memory import estimate_memory, lora_params_per_block
from megawan.utils.user_errors import run_main

GB = 1024**3


def latent_size(preset: str, frames: int, height: int, width: int):
    """Latent (frames, height, width) of a video; a size the VAE cannot take is one line naming the flag."""
    return video_latent_size(dit_preset(preset), frames, height, width)


def overrides(parallel: ParallelConfig) -> str:
    """The layout as `megawan train` overrides, ready to paste after --config."""
    p = parallel
    items = [f"parallel.tensor_parallel={p.tensor_parallel}", f"parallel.pipeline_parallel={p.pipeline_parallel}",
             f"parallel.context_parallel={p.context_parallel}"]
    if p.context_parallel > 1:
        items.append(f"parallel.context_parallel_mode={p.context_parallel_mode}")
    items += [f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}", f"parallel.recompute={p.recompute}"]
    if p.offload_blocks:
        items.append(f"parallel.offload_blocks={p.offload_blocks}")
    return " ".join(items)


def offload_needed(cfg, parallel: ParallelConfig, gpus: int, tokens: int, micro_batch: int, budget: float,
                   max_offload: int, ema: bool = False, lora=None):
    """The fewest offloaded blocks (<= max_offload) that bring the layout under budget bytes, or None."""
    layers = cfg.num_layers // parallel.pipeline_parallel
    for k in range(0, min(max_offload, layers) + 1):
        trial = dataclasses.replace(parallel, offload_blocks=k)
        if estimate_memory(cfg, trial, gpus, tokens, micro_batch, ema=ema, lora=lora).total <= budget:
            return trial
    return None


def plan(preset: str, frames: int, height: int, width: int, gpus: int, gpu_memory_gb: float,
         micro_batch: int = 1, headroom: float = 0.9, max_offload: int = 4, ema: bool = False,
         lora: LoRAConfig | None = None):
    """lora: a `lora:` section with rank > 0 plans a LoRA fine-tune (frozen base, trainable adapters)."""
    cfg = dit_preset(preset)
    f, h, w = latent_size(preset, frames, height, width)
    tokens = count_tokens(cfg, f, h, w)
    step_flops = 3 * flops(cfg, micro_batch, f, h, w)
    budget = gpu_memory_gb * GB * headroom
    rows = []
    powers = [1, 2, 4, 8, 16, 32, 64]
    for tp, pp, cp, recompute in itertools.product([1, 2, 4, 8], [1, 2, 4, 8], powers, ["none", "full"]):
        if tp * pp * cp > gpus or gpus % (tp * pp * cp):
            continue
        for mode in (["ulysses", "ring"] if cp > 1 else ["ulysses"]):
            parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
                                      context_parallel_mode=mode, sequence_parallel=tp > 1, recompute=recompute)
            try:
                RunConfig(model=cfg, parallel=parallel).validate(gpus)
            except ConfigError:
                continue
            if recompute == "none":
                parallel = offload_needed(cfg, parallel, gpus, tokens, micro_batch, budget, max_offload, ema,
                                          lora) or parallel
            mem = estimate_memory(cfg, parallel, gpus, tokens, micro_batch, ema=ema, lora=lora)
            rows.append((parallel, mem, step_flops * parallel.data_parallel(gpus) / gpus))
    fits = [r for r in rows if r[1].total <= budget]
    # prefer: least recompute, then fewest offloaded blocks, then fewest model-parallel ranks (more DP), then
    # least memory
    order = {"none": 0, "full": 1}
    fits.sort(key=lambda r: (order[r[0].recompute], r[0].offload_blocks,
                             r[0].tensor_parallel * r[0].pipeline_parallel * r[0].context_parallel, r[1].total))
    return cfg, tokens, fits, rows


def main(argv=None) -> int:
    """0 a layout fits; 1 none does; 2 a user error (one line, e.g. an unknown preset)."""
    return run_main("plan_parallel.py", _main, argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="the model preset (default: the --config run's)")
    ap.add_argument("--config", help="a run config: its model preset, micro batch, EMA and lora: section")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--max-offload", type=int, default=4,
                    help="most blocks per stage whose activations may go to host memory (0: never offload)")
    ap.add_argument("--ema", action="store_true", help="the run keeps an EMA of the weights (train.ema_decay > 0)")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA fine-tune: adapter rank (0: full training)")
    ap.add_argument("--lora-targets", help="LoRA: comma-separated linears (peft's target_modules; default all)")
    args = ap.parse_args(argv)
    lora = LoRAConfig()
    if args.config:
        run = load_config(args.config)
        args.preset = args.preset or run.model.name
        args.ema = args.ema or run.train.ema_decay > 0
        lora = run.lora
        if args.micro_batch == 1:
            args.micro_batch = run.data.micro_batch_size
    if not args.preset:
        raise ConfigError("--preset: give a model preset (or --config of a run)")
    if args.lora_rank is not None or args.lora_targets:
        targets = tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else lora.targets
        lora = LoRAConfig(rank=lora.rank if args.lora_rank is None else args.lora_rank, alpha=lora.alpha,
                          targets=targets).validate("--lora")
    cfg, tokens, fits, rows = plan(args.preset, args.frames, args.height, args.width, args.gpus,
                                   args.gpu_memory_gb, args.micro_batch, max_offload=args.max_offload, ema=args.ema,
                                   lora=lora)
    tuned = (f"LoRA rank {lora.rank}, {lora_params_per_block(cfg, lora) * cfg.num_layers / 1e6:.1f}M adapter params"
             if lora.enabled else "full fine-tune")
    print(f"{args.preset}: {args.frames} frames {args.height}x{args.width} -> {tokens:,} tokens/sample; "
          f"{args.gpus} GPUs x {args.gpu_memory_gb:g} GB; {tuned}; {len(fits)} of {len(rows)} layouts fit "
          "(90% of memory)")
    print(f"{'TP':>3} {'PP':>3} {'CP':>3} {'DP':>3} {'cp mode':8} {'recompute':9} {'offload':>7} {'params/GPU':>11} "
          f"{'weights':>8} {'grads':>8} {'optim':>8} {'ema':>8} {'activ':>8} {'total GB':>9} {'TFLOP/GPU/microbatch':>21}")
    for parallel, mem, per_gpu_flops in fits[: args.top]:
        print(f"{parallel.tensor_parallel:3} {parallel.pipeline_parallel:3} {parallel.context_parallel:3} "
              f"{parallel.data_parallel(args.gpus):3} {parallel.context_parallel_mode if parallel.context_parallel > 1 else '-':8} "
              f"{parallel.recompute:9} {parallel.offload_blocks:7} {mem.params_per_gpu / 1e9:10.2f}B {mem.weights / GB:8.1f} {mem.grads / GB:8.1f} "
              f"{mem.optimizer / GB:8.1f} {mem.ema / GB:8.1f} {mem.activations / GB:8.1f} {mem.total / GB:9.1f} {per_gpu_flops / 1e12:21.1f}")
    if not fits:
        print("no layout fits: more GPUs, recompute, or a smaller video")
        return 1
    print(f"\nfirst choice, as overrides for megawan train:\n  {overrides(fits[0][0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
