#!/usr/bin/env python3
"""Wan-VAE benchmark: encode / decode time against diffusers' AutoencoderKLWan with the same weights, in the
same run (ratio), and peak memory against video length (the causal chunking keeps it flat).

    python tools/bench_vae.py --preset wan2.1 --height 64 --width 64 --frames 17 33 81
    python tools/bench_vae.py --preset tiny-2.1 --height 32 --width 32 --frames 5 9 --repeats 1   # smoke run

Weights are random (no checkpoint download here). Peak memory: CUDA's max_memory_allocated on GPU; on CPU
the highest resident set size sampled every 2 ms during the call, minus the size just before it. Each
measurement runs in its own process so peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time

import psutil
import torch

from megawan.capabilities import rank_device
from megawan.config import vae_preset
from megawan.models.vae import WanVAE


def _build(preset: str, which: str, device: str):
    cfg = vae_preset(preset)
    torch.manual_seed(0)
    ours = WanVAE(cfg).eval()
    if which == "ours":
        return cfg, ours.to(device)
    from diffusers import AutoencoderKLWan  # an optional dependency: only the reference side needs it

    ref = AutoencoderKLWan(
        base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
        temperal_downsample=list(cfg.temperal_downsample), is_residual=cfg.is_residual, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, patch_size=cfg.patch_size, scale_factor_spatial=cfg.spatial_stride,
        latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std),
    ).eval()
    ref.load_state_dict(ours.state_dict())  # our names are diffusers' names
    return cfg, ref.to(device)


class _RssSampler:
    """Peak resident memory above the level at start(), sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        self.process, self.interval = psutil.Process(), interval

    def start(self):
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, self.process.memory_info().rss) - self.base


def _measure(preset, which, op, frames, height, width, repeats, device, queue):
    torch.set_num_threads(torch.get_num_threads())
    cfg, model = _build(preset, which, device)
    g = torch.Generator().manual_seed(1)
    video = (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(device)
    s = cfg.spatial_stride
    z = torch.randn(1, cfg.z_dim, 1 + (frames - 1) // 4, height // s, width // s, generator=g).to(device)

    def run():
        with torch.no_grad():
            if which == "ours":
                return model.encode(video)[0] if op == "encode" else model.decode(z)
            return model.encode(video).latent_dist.mean if op == "encode" else model.decode(z).sample

    rss = _RssSampler()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    rss.start()
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss.stop()
    queue.put(dict(seconds=statistics.median(times), peak_bytes=peak))


def measure(preset, which, op, frames, height, width, repeats, device):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(preset, which, op, frames, height, width, repeats, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--frames", type=int, nargs="+", default=[17, 33, 81])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=str(rank_device()))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    rows = []
    print(f"{args.preset} VAE, {args.height}x{args.width}, {args.device}, median of {args.repeats}")
    print(f"{'op':7} {'frames':>6} {'megawan s':>10} {'diffusers s':>12} {'ratio':>6} {'megawan peak MB':>16} {'diffusers peak MB':>18}")
    for op in ("encode", "decode"):
        for frames in args.frames:
            ours = measure(args.preset, "ours", op, frames, args.height, args.width, args.repeats, args.device)
            ref = measure(args.preset, "diffusers", op, frames, args.height, args.width, args.repeats, args.device)
            row = dict(op=op, frames=frames, ours=ours, diffusers=ref, ratio=ref["seconds"] / ours["seconds"])
            rows.append(row)
            print(f"{op:7} {frames:6} {ours['seconds']:10.3f} {ref['seconds']:12.3f} {row['ratio']:6.2f} "
                  f"{ours['peak_bytes'] / 2**20:16.1f} {ref['peak_bytes'] / 2**20:18.1f}")
    for op in ("encode", "decode"):
        peaks = {r["frames"]: r["ours"]["peak_bytes"] for r in rows if r["op"] == op}
        lo, hi = min(peaks), max(peaks)
        if lo != hi and peaks[lo] > 0:
            print(f"{op}: megawan peak at {hi} frames / peak at {lo} frames = {peaks[hi] / peaks[lo]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
