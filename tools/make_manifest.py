#!/usr/bin/env python3
"""Make the manifest precompute reads from a folder of clips / images with captions, or from a CSV.

    python tools/make_manifest.py dataset/ --out dataset/manifest.jsonl
    python tools/make_manifest.py list.csv --out manifest.jsonl        # columns path (or video), caption (or text)

A folder (searched recursively): every .mp4 .webm .mkv .mov .avi .png .jpg .jpeg .webp with its caption in the
.txt of the same name beside it (clip.mp4 + clip.txt). Every file is probed (PyAV / PIL: size, rate, frames,
duration); files that cannot be read, clips without a caption and repeated ids are left out and listed, with
the reason, in OUT.skipped.jsonl. Then:

    python tools/precompute_latents.py --manifest dataset/manifest.jsonl --out latents.zarr ...

WebDataset tar shards need no manifest: precompute reads them as they are (docs/data.md).
"""

import argparse
import sys

from megawan.data.folder_manifest import make_manifest
from megawan.utils.user_errors import UserError, run_main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a folder of clips and images with same-name .txt captions, or a .csv")
    ap.add_argument("--out", required=True, help="the manifest to write (.jsonl)")
    ap.add_argument("--workers", type=int, default=8, help="files probed at once")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """0 written; 2 a user error (one line: no such folder, a CSV without its columns, nothing usable)."""
    return run_main("make_manifest.py", _main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if not args.out.endswith(".jsonl"):
        raise UserError(f"--out {args.out}: a manifest is a .jsonl file")
    summary = make_manifest(args.source, args.out, workers=args.workers, progress=not args.no_progress)
    skipped = summary["skipped"]
    print(f"{summary['out']}: {summary['written']} entries ({summary['videos']} videos, {summary['images']} images); "
          f"skipped {len(skipped)} (reasons in {summary['skipped_report']})", flush=True)
    for row in skipped[:20]:
        print(f"  {row['path']}: {row['reason']}", flush=True)
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
