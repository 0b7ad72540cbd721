#!/usr/bin/env python3
"""Pixel loader benchmark: samples/s and decoded frames/s that `PixelLoader` (the VAE's data, decoded on the fly)
gives with N worker threads, against the rate a VAE training run consumes (`--need`, e.g. train-vae's samples/s).

    python tools/bench_pixel_loader.py --make 32 --source 33x480x832 --bucket 17x256x256 --workers 1 2 4 8
    python tools/bench_pixel_loader.py --manifest clips.jsonl --bucket 17x256x256 --workers 4 8 --need 40

--make N writes N synthetic H.264 clips (moving shapes, `megawan.demo.shapes`) of --source FxHxW to a temporary
folder first. Each row: one loader from the start (scan excluded: it is timed apart), the first batch excluded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from typing import Optional

from megawan.data.buckets import Bucket
from megawan.data.pixel_loader import PixelLoader
from megawan.demo.shapes import write_synthetic_dataset


def measure(manifest: str, bucket: str, batch: int, workers: int, steps: int, decode: str) -> dict:
    start = time.perf_counter()
    loader = PixelLoader(manifest, buckets=[bucket], global_batch_size=batch, num_workers=workers, decode=decode,
                         verbose=False)
    scan_seconds = time.perf_counter() - start
    it = iter(loader)
    next(it)  # the pool starts; the first batch pays for it
    start = time.perf_counter()
    for _ in itertools.islice(it, steps):
        pass
    seconds = time.perf_counter() - start
    frames = Bucket.from_name(bucket).frames
    return {"workers": workers, "samples_per_s": steps * batch / seconds,
            "frames_per_s": steps * batch * frames / seconds, "seconds": seconds, "scan_seconds": scan_seconds,
            "samples": sum(loader.counts.values())}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", help="an existing manifest (else --make)")
    ap.add_argument("--make", type=int, default=0, help="write this many synthetic clips first")
    ap.add_argument("--source", default="33x480x832", help="the synthetic clips' FRAMESxHEIGHTxWIDTH")
    ap.add_argument("--bucket", default="17x256x256")
    ap.add_argument("--batch", type=int, default=1, help="samples per batch")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--decode", default="auto", help="auto | pyav | dali-cpu | dali-gpu")
    ap.add_argument("--need", type=float, default=None, help="samples/s the training run consumes, to compare")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest
        if manifest is None:
            if not args.make:
                ap.error("give --manifest or --make N")
            source = Bucket.from_name(args.source)
            manifest = write_synthetic_dataset(tmp, args.make, frames=source.frames, height=source.height,
                                               width=source.width)
        rows = [measure(manifest, args.bucket, args.batch, w, args.steps, args.decode) for w in args.workers]
    print(f"bucket {args.bucket}: {rows[0]['samples']} samples, scan {rows[0]['scan_seconds']:.2f} s")
    need = f"  {'x need':>6}" if args.need else ""
    print(f"{'workers':>7}  {'samples/s':>9}  {'frames/s':>8}{need}")
    for r in rows:
        ratio = f"  {r['samples_per_s'] / args.need:>6.2f}" if args.need else ""
        print(f"{r['workers']:>7}  {r['samples_per_s']:>9.2f}  {r['frames_per_s']:>8.1f}{ratio}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bucket": args.bucket, "need": args.need, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
