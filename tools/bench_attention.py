#!/usr/bin/env python3
"""Attention benchmark: megawan's FP8 Triton attention (kernels/fp8_flash_attention.py) against torch's bf16
attention backends (flash, cuDNN) on the same inputs, in the same run.

    python tools/bench_attention.py                       # 32,760 tokens (480p x 81 frames), 12 and 40 heads
    python tools/bench_attention.py --tokens 37440 --heads 40 --json out.json

Reports per implementation and shape: forward and forward + backward time (median, CUDA events through
triton.testing.do_bench), attention TFLOP/s (forward 4·s²·d per head, backward 2.5× that), and the output's
relative Frobenius error against fp32 attention (first two heads). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megawan.capabilities import cuda_available


def _impls():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.fp8_flash_attention import fp8_attention  # Triton: an optional dependency

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    return {"fp8-triton": fp8_attention, "bf16-flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "bf16-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def bench_shape(tokens: int, heads: int, head_dim: int, batch: int = 1) -> dict:
    import triton.testing

    g = torch.Generator(device="cuda").manual_seed(0)
    # the model's layout: [s, b, h, d] memory seen as [b, h, s, d]
    q, k, v = (torch.randn(tokens, batch, heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
               .permute(1, 2, 0, 3).requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t[:, :2].detach().float() for t in (q, k, v)))
    fwd_flops = 4 * batch * heads * tokens * tokens * head_dim
    rows = {}
    for name, fn in _impls().items():
        try:
            with torch.no_grad():
                out = fn(q, k, v)
                err = ((out[:, :2].float() - ref).norm() / ref.norm()).item()
                fwd = triton.testing.do_bench(lambda: fn(q, k, v), warmup=50, rep=300, return_mode="median")

            def step():
                fn(q, k, v).backward(grad)
                q.grad = k.grad = v.grad = None

            both = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
        except RuntimeError as e:  # a backend torch cannot run for this shape / GPU
            rows[name] = {"error": str(e).splitlines()[0]}
            continue
        if name == "fp8-triton":
            from kernels.fp8_flash_attention import last_backward  # Triton: an optional dependency

            print(f"  (fp8-triton backward: torch's {last_backward()} kernel)")
        rows[name] = {"fwd_ms": fwd, "fwd_tflops": fwd_flops / fwd / 1e9, "fwd_bwd_ms": both,
                      "fwd_bwd_tflops": 3.5 * fwd_flops / both / 1e9, "rel_err_vs_fp32": err}
    base = rows.get("bf16-flash", {}).get("fwd_ms")
    for r in rows.values():
        if base and "fwd_ms" in r:
            r["fwd_speedup_vs_flash"] = base / r["fwd_ms"]
    return {"tokens": tokens, "heads": heads, "head_dim": head_dim, "batch": batch, "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=[32760])
    ap.add_argument("--heads", type=int, nargs="*", default=[12, 40])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not cuda_available():
        print("bench_attention needs a CUDA GPU (the FP8 kernel is Triton; the CPU interpreter is ~300x slower)")
        return 2
    out = []
    print(f"{torch.cuda.get_device_name()}; head_dim {args.head_dim}")
    print(f"{'tokens':>7} {'heads':>5} {'impl':12} {'fwd ms':>8} {'TFLOP/s':>8} {'f+b ms':>8} {'TFLOP/s':>8} "
          f"{'err':>7} {'x flash':>7}")
    for tokens in args.tokens:
        for heads in args.heads:
            r = bench_shape(tokens, heads, args.head_dim)
            out.append(r)
            for name, row in r["results"].items():
                if "error" in row:
                    print(f"{tokens:7d} {heads:5d} {name:12} {row['error'][:60]}")
                    continue
                print(f"{tokens:7d} {heads:5d} {name:12} {row['fwd_ms']:8.2f} {row['fwd_tflops']:8.1f} "
                      f"{row['fwd_bwd_ms']:8.2f} {row['fwd_bwd_tflops']:8.1f} {row['rel_err_vs_fp32']:7.4f} "
                      f"{row.get('fwd_speedup_vs_flash', float('nan')):7.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
