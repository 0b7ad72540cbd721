#!/usr/bin/env python3
"""Loader benchmark: samples/s and MB/s that `BucketedLoader` reads from a latent store with N worker threads,
against the rate at which one H100 consumes such samples when training (from the FLOP counter).

    python tools/bench_loader.py --make 64 --bucket 81x480x832 --workers 1 2 4 8          # 480p x 81 latents
    python tools/bench_loader.py --store latents.zarr --bucket 81x480x832 --workers 4 8

--make N writes a store of N samples of the bucket's shape (random bf16 latents that compress like real ones,
i.e. hardly; umT5 states of a 20-token caption zero-padded to 512) to a temporary folder first. The H100's
rate: one training step of the model (3 x forward FLOPs) at --tflops model TFLOP/s per GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import torch

from megawan.config import dit_preset
from megawan.data.buckets import Bucket
from megawan.data.loader import BucketedLoader
from megawan.data.store import LatentStore, Sample
from megawan.models.dit.flops import flops

STRIDE = (4, 8, 8)  # the Wan-VAE's (temporal, height, width) stride


def make_store(path: str, count: int, bucket: str, z_dim: int, text_len: int, text_dim: int, seed: int = 0):
    shape = (z_dim, *Bucket.from_name(bucket).latent_shape(STRIDE))
    store = LatentStore.create(path, vae={"name": "bench", "z_dim": z_dim, "stride": list(STRIDE)},
                               text_encoder={"name": "bench", "max_length": text_len, "dim": text_dim})
    writer, g = store.writer(0), torch.Generator().manual_seed(seed)
    for i in range(count):
        n = min(20, text_len)
        text = torch.zeros(text_len, text_dim)
        text[:n] = torch.randn(n, text_dim, generator=g)
        writer.write(Sample(id=f"s{i}", bucket=bucket, latents=torch.randn(shape, generator=g).to(torch.bfloat16),
                            text=text.to(torch.bfloat16), text_length=n))
    return store


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def measure(store_path: str, bucket: str, batch: int, workers: int, steps: int) -> dict:
    loader = BucketedLoader(store_path, global_batch_size=batch, buckets=[bucket], num_workers=workers, prefetch=2)
    it = iter(loader)
    next(it)  # the pool and the arrays open; the first read pays for it
    start = time.perf_counter()
    nbytes = 0
    for b in itertools.islice(it, steps):
        nbytes += b["latents"].numel() * b["latents"].element_size() + b["text"].numel() * b["text"].element_size()
    seconds = time.perf_counter() - start
    return {"workers": workers, "samples_per_s": steps * batch / seconds, "mb_per_s_decoded": nbytes / seconds / 1e6,
            "seconds": seconds}


def h100_samples_per_s(model: str, bucket: str, tflops: float) -> tuple:
    cfg = dit_preset(model)
    step = 3 * flops(cfg, 1, *Bucket.from_name(bucket).latent_shape(STRIDE))
    return tflops * 1e12 / step, step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="an existing store (else --make)")
    ap.add_argument("--make", type=int, default=0, help="write a store of this many samples first")
    ap.add_argument("--bucket", default="81x480x832")
    ap.add_argument("--z-dim", type=int, default=16)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="samples per batch")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--model", default="wan2.1-t2v-14b", help="the model whose H100 consumption rate to compare")
    ap.add_argument("--tflops", type=float, default=400.0, help="model TFLOP/s one H100 sustains")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.store
        if path is None:
            if not args.make:
                ap.error("give --store or --make N")
            path = os.path.join(tmp, "bench.zarr")
            make_store(path, args.make, args.bucket, args.z_dim, args.text_len, args.text_dim)
        count = LatentStore.open(path).count(args.bucket)
        disk = dir_bytes(os.path.join(path, "buckets", args.bucket)) / count
        need, step_flops = h100_samples_per_s(args.model, args.bucket, args.tflops)
        rows = [measure(path, args.bucket, args.batch, w, args.steps) for w in args.workers]
    pixels = Bucket.from_name(args.bucket)
    raw = pixels.frames * pixels.height * pixels.width * 3 * 4
    print(f"bucket {args.bucket}: {count} samples, {disk / 1e6:.2f} MB per sample on disk "
          f"(raw fp32 pixels {raw / 1e6:.1f} MB: {raw / disk:.0f}x smaller)")
    print(f"one H100 training {args.model} at {args.tflops:g} model TFLOP/s: {step_flops / 1e12:.0f} TFLOP per "
          f"sample -> {need:.3f} samples/s")
    print(f"{'workers':>7}  {'samples/s':>9}  {'MB/s (disk)':>11}  {'MB/s (decoded)':>14}  {'x H100 need':>11}")
    for r in rows:
        r["mb_per_s_disk"] = r["samples_per_s"] * disk / 1e6
        r["ratio_vs_h100"] = r["samples_per_s"] / need
        print(f"{r['workers']:>7}  {r['samples_per_s']:>9.1f}  {r['mb_per_s_disk']:>11.1f}  "
              f"{r['mb_per_s_decoded']:>14.1f}  {r['ratio_vs_h100']:>11.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bucket": args.bucket, "disk_bytes_per_sample": disk, "h100_samples_per_s": need,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
