#!/usr/bin/env python3
"""Where the time of one DiT training step goes: torch.profiler over one step (after warm-up) of megawan's and
diffusers' Wan transformer, the same config and inputs as tools/bench_dit.py, GPU kernels grouped by kind
(attention forward / backward, matrix products, elementwise and norms, Triton kernels, copies, optimizer).

    python tools/profile_dit.py --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 --impl megawan diffusers
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from megawan.config import dit_preset

KINDS = [  # first match wins: (kind, substrings of the kernel name)
    ("attention-bwd", ("bwd", "backward", "dgrad", "dot_do_o")),
    ("attention-fwd", ("flash_fwd", "fmha", "cudnn", "_attention_kernel", "sm90_flash", "fprop")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "scaled_mm")),
    ("triton", ("triton_", "_kernel")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("copy / cast", ("copy", "cast", "to_copy", "Memcpy", "memset", "fill")),
    ("reduction / norm", ("reduce", "norm", "softmax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(s.lower() in low for s in keys):
            return k
    return "other"


def profile(impl: str, cfg, latent, precision: str, fp8_attention: bool, recompute: str) -> dict:
    sys.path.insert(0, "tools")
    import bench_dit

    device = torch.device("cuda")
    x, t, text, target = bench_dit.step_inputs(cfg, latent, 1, torch.bfloat16, device)
    build = bench_dit._diffusers_model if impl.startswith("diffusers") else bench_dit._megawan_model
    model = build(cfg, torch.bfloat16, device).train()
    bench_dit._recompute(impl, model, recompute, 1)
    step = bench_dit._step_fn(impl, model, (x, t, text, target), precision, fp8_attention)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = collections.Counter()
    groups = collections.Counter()
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0:
            continue
        kernels[e.key] += us
        groups[kind(e.key)] += us
    total = sum(groups.values())
    del model, step
    torch.cuda.empty_cache()
    return {"impl": impl, "gpu_ms": total / 1e3, "groups_ms": {k: v / 1e3 for k, v in groups.most_common()},
            "top_kernels_ms": [(k[:110], v / 1e3) for k, v in kernels.most_common(14)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wan2.1-t2v-14b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--latent", type=int, nargs=3, default=(24, 60, 104))
    ap.add_argument("--impl", nargs="*", default=["megawan", "diffusers"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--fp8-attention", action="store_true")
    ap.add_argument("--recompute", default="none", choices=["none", "full"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cfg = dit_preset(args.model, num_layers=args.layers)
    out = []
    for impl in args.impl:
        r = profile(impl, cfg, tuple(args.latent), args.precision if impl.startswith("megawan") else "bf16",
                    args.fp8_attention, args.recompute)
        out.append(r)
        print(f"== {impl}: {r['gpu_ms']:.1f} ms of GPU kernels in one step")
        print("   " + ", ".join(f"{k} {v:.1f}" for k, v in r["groups_ms"].items()))
        for name, ms in r["top_kernels_ms"]:
            print(f"   {ms:8.2f} ms  {name}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
