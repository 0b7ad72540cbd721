#!/usr/bin/env python3
"""DiT training-step benchmark: one step (forward, backward, AdamW) of megawan's Wan DiT against diffusers'
WanTransformer3DModel (SDPA; optionally under torch.compile) with the same config, in the same run.

    # the 1.3B model at 480p x 81 frames (latents 21 x 60 x 104: 32,760 tokens)
    python tools/bench_dit.py --model wan2.1-t2v-1.3b --latent 21 60 104 --compare diffusers diffusers-compile
    # a 14B-width stack of 4 blocks at the 37,440-token shape of the published Megatron Wan trainer
    python tools/bench_dit.py --model wan2.1-t2v-14b --layers 4 --latent 24 60 104 --compare diffusers
    python tools/bench_dit.py --tiny          # CPU smoke run (what CI runs)

Reports per implementation: seconds per step (median of --steps after --warmup), model TFLOP/s from
megawan's FLOP counter (3 x forward), peak memory (CUDA max_memory_allocated; CPU: not measured), and the
step-time ratio diffusers / megawan (> 1: megawan is faster). Weights are random; both models get the same
dtype (bf16 on GPU, fp32 on CPU), the same inputs and plain torch AdamW, so the ratio compares the models.
`--precision fp8` runs megawan's step in FP8: Transformer Engine's fp8_autocast (delayed scaling) on the te
backend, else the local backend's plain-torch FP8 products (current scaling, torch._scaled_mm).

FP8 side by side in one run, against megawan BF16 (--precision bf16) and diffusers:
    python tools/bench_dit.py --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 \
        --compare megawan-fp8 megawan-fp8-delayed megawan-fp8-torchao diffusers diffusers-compile
megawan-fp8 / megawan-fp8-delayed: our FP8 linears (local backend, current / delayed scaling, --amax-history);
megawan-fp8-torchao: the same model with every linear's product through torchao's Float8Linear (tensorwise
dynamic scaling, what torchao.float8.convert_to_float8_training applies), each under torch.compile as torchao
intends; reported as skipped, with the reason, where torchao is not importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import sys
import time

import torch

from kernels.dispatch import compile_kwargs
from megawan.capabilities import rank_device, resolve_backend
from megawan.config import dit_preset
from megawan.models.dit import WanDiT, flops
from megawan.models.dit.parallelize import apply_activation_recompute, apply_compile
from megawan.training.precision import fp8_context


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _diffusers_model(cfg, dtype, device):
    from diffusers import WanTransformer3DModel  # diffusers: an optional dependency

    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, eps=cfg.eps,
    ).to(device=device, dtype=dtype)


OURS_FP8 = {"megawan-fp8": "current", "megawan-fp8-delayed": "delayed"}  # our FP8 linears, local backend
TORCHAO = "megawan-fp8-torchao"


def torchao_missing():
    """Why the torchao implementation cannot run here, or None."""
    try:
        importlib.import_module("torchao.float8")  # torchao: an optional dependency
    except ImportError as e:
        return f"torchao is not importable ({e})"
    return None


def torchao_fp8(model, compile: bool = True) -> int:
    """Route every megatron linear's product (TP 1) through torchao's Float8Linear, sharing the weight: nn.Linear
    shells of the weights go through convert_to_float8_training, and each linear's _forward_impl calls its
    converted shell (compiled: torchao's casts are fused by Inductor) plus the bias. Returns how many linears."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torchao.float8 import convert_to_float8_training  # torchao: an optional dependency

    targets = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    shells = torch.nn.ModuleList()
    for m in targets:
        with torch.device("meta"):
            shell = torch.nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=False)
        shell.weight = m.weight
        shells.append(shell)
    convert_to_float8_training(shells)
    for m, f8 in zip(targets, shells):
        def forward_impl(input, weight, bias=None, _f8=torch.compile(f8) if compile else f8, **kwargs):
            out = _f8(input)
            return out + bias if bias is not None else out
        m._forward_impl = forward_impl  # an instance attribute: megatron's forward calls self._forward_impl
    return len(targets)


def _megawan_model(cfg, dtype, device, backend=None):
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    overrides = {"params_dtype": name} if backend is None else {"params_dtype": name, "backend": backend}
    model = WanDiT(dataclasses.replace(cfg, **overrides)).to(device)
    with torch.no_grad():  # Wan zero-initialises the head; a real checkpoint does not have zeros there
        model.head.linear.weight.normal_(0, 0.02)
    return model


def step_inputs(cfg, latent: tuple, batch: int, dtype, device):
    """The same random (latents, timesteps, text states, target) for every implementation (seed 0)."""
    frames, height, width = latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_dim, frames, height, width, generator=g).to(device, dtype)
    t = (torch.rand(batch, generator=g) * 1000).to(device)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype)
    target = torch.randn(batch, cfg.out_dim, frames, height, width, generator=g).to(device)
    return x, t, text, target


def _recompute(impl: str, model, mode: str, every: int):
    """Full activation recompute on both sides (diffusers: its gradient checkpointing, every block)."""
    if mode == "none":
        return
    if impl.startswith("diffusers"):
        model.enable_gradient_checkpointing()
    else:
        apply_activation_recompute(model, mode, every)


def fp8_recipe_of(impl: str, precision: str, backend: str):
    """(recipe, backend) of the FP8 context around impl's forward, None where it runs without one."""
    if impl in OURS_FP8:
        return OURS_FP8[impl], "local"
    if impl in ("megawan", "megawan-compile") and precision == "fp8":
        return ("delayed" if backend == "te" else "current"), backend
    return None


def _step_fn(impl: str, model, inputs, precision: str, fp8_attention: bool = False, amax_history: int = 1024):
    x, t, text, target = inputs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=x.is_cuda)

    if impl.startswith("diffusers"):
        forward = model if impl == "diffusers" else torch.compile(model)

        def run():
            return forward(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    else:
        # megawan-compile: the whole model; megawan-compile-blocks: each block (bench()), like train.compile: blocks
        forward = torch.compile(model, **compile_kwargs()) if impl == "megawan-compile" else model
        fp8 = fp8_recipe_of(impl, precision, resolve_backend(model.dit_config.backend))

        def run():
            if fp8:
                with fp8_context(fp8[0], fp8[1], fp8_attention, amax_history):
                    return forward(x, t, text)
            return forward(x, t, text)

    def step():
        out = run()
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def bench(cfg, latent: tuple, batch: int, impls: list, precision: str, warmup: int, steps: int, device,
          recompute: str = "none", recompute_every: int = 1, fp8_attention: bool = False,
          amax_history: int = 1024) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames, height, width = latent
    x, t, text, target = step_inputs(cfg, latent, batch, dtype, device)
    model_flops = 3 * flops(cfg, batch, frames, height, width)
    results = {}
    for impl in impls:
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if impl == TORCHAO and torchao_missing():
            results[impl] = {"skipped": torchao_missing()}
            continue
        model = step = None
        try:
            if impl.startswith("diffusers"):
                model = _diffusers_model(cfg, dtype, device).train()
            else:  # ours in FP8 and torchao's need the local backend's megatron linears
                local = impl in OURS_FP8 or impl == TORCHAO
                model = _megawan_model(cfg, dtype, device, "local" if local else None).train()
                if impl == TORCHAO:
                    torchao_fp8(model)
                apply_compile(model, "blocks" if impl == "megawan-compile-blocks" else "none")  # before recompute
            _recompute(impl, model, recompute, recompute_every)
            step = _step_fn(impl, model, (x, t, text, target), precision if impl.startswith("megawan") else "bf16",
                            fp8_attention, amax_history)
            times = []
            for i in range(warmup + steps):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # one implementation failing (OOM, a compile error)
            results[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}  # keeps the others
            continue  # (the next implementation's `model = step = None` frees this one)
        seconds = statistics.median(times)
        results[impl] = {"seconds": seconds, "model_tflops": model_flops / seconds / 1e12,
                         "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}
        print(f"  {impl}: {seconds:.4f} s/step", flush=True)  # a run cut short by a timeout keeps its lines
        del model, step
    base = results.get("megawan", {}).get("seconds")
    for impl, r in results.items():
        if base and "seconds" in r:
            r["ratio_vs_megawan"] = r["seconds"] / base  # > 1: megawan is faster
    return {"model": cfg.name, "layers": cfg.num_layers, "latent": list(latent), "batch": batch,
            "tokens": frames * (height // 2) * (width // 2), "precision": precision, "fp8_attention": fp8_attention,
            "recompute": recompute, "recompute_every": recompute_every,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "model_flops_per_step": model_flops, "results": results}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wan2.1-t2v-1.3b", help="a DiT preset")
    ap.add_argument("--layers", type=int, help="keep only this many blocks (a 14B-width stack)")
    ap.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), metavar=("F", "H", "W"),
                    help="latent frames, height, width (480p x 81 frames: 21 60 104)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--fp8-attention", action="store_true",
                    help="with --precision fp8: the self-attention in FP8 too (TE fp8_dpa / our Triton kernel)")
    ap.add_argument("--recompute", default="none", choices=["none", "full"],
                    help="activation recompute, on both sides (diffusers: gradient checkpointing of every block)")
    ap.add_argument("--recompute-every", type=int, default=1, help="megawan: recompute every N-th block only")
    ap.add_argument("--compare", nargs="*", default=["diffusers"],
                    choices=["diffusers", "diffusers-compile", "megawan-compile", "megawan-compile-blocks", *OURS_FP8,
                             TORCHAO])
    ap.add_argument("--amax-history", type=int, default=1024, help="megawan-fp8-delayed's amax history length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="the tiny preset at a tiny shape (CPU smoke run)")
    ap.add_argument("--json", help="also write the result here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = rank_device()
    if args.tiny:
        cfg, latent, warmup, steps = dit_preset("tiny"), (3, 8, 8), 1, 2
    else:
        overrides = {"num_layers": args.layers} if args.layers else {}
        cfg, latent, warmup, steps = dit_preset(args.model, **overrides), tuple(args.latent), args.warmup, args.steps
    impls = ["megawan"] + list(args.compare)
    result = bench(cfg, latent, args.batch, impls, args.precision, warmup, steps, device, args.recompute,
                   args.recompute_every, args.fp8_attention, args.amax_history)
    print(f"{result['model']} x{result['layers']} layers, latent {latent} ({result['tokens']} tokens), "
          f"batch {args.batch}, {result['dtype']} / {args.precision}{' + fp8 attention' * args.fp8_attention}, "
          f"recompute {args.recompute}, on {result['device']}")
    print(f"{'implementation':20} {'s/step':>10} {'TFLOP/s':>10} {'peak GB':>9} {'ratio':>7}")
    for impl, r in result["results"].items():
        if "error" in r or "skipped" in r:
            print(f"{impl:20} {r.get('error') or 'skipped: ' + r['skipped']}")
            continue
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        print(f"{impl:20} {r['seconds']:10.4f} {r['model_tflops']:10.3f} {peak:>9} {r.get('ratio_vs_megawan', float('nan')):7.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
