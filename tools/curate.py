#!/usr/bin/env python3
"""Curate raw clips before precompute: scene cuts, motion, exposure, blur, black borders, duplicates.

    python tools/curate.py --manifest clips.jsonl --out curated/                  # defaults (docs/curation.md)
    python tools/curate.py --manifest raw_folder/ --out curated/ --config examples/configs/curate.yaml \
        thresholds.blur_min=60 thresholds.static_max=0.2
    torchrun --nproc-per-node 8 tools/curate.py --manifest clips.jsonl --out curated/      # or under srun

Writes curated/report.jsonl (one line per input clip: keep, reasons, scenes, crop, motion, duplicate_of,
measures, probe), curated/manifest.jsonl (the kept scenes, with a letterbox's crop, as tools/precompute_latents.py
reads them) and
curated/report.html. Each rank measures a disjoint slice; run it again after a kill and it measures only what is
missing. A folder instead of a manifest is listed first (clip.mp4 + clip.txt captions, megawan.data.folder_manifest).
"""

import argparse
import json
import os
import sys

from megawan.config.curate import load_curate_config
from megawan.data.manifest import read_manifest
from megawan.utils.user_errors import UserError, run_main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="JSONL or CSV manifest (path, caption[, id, start, end, fps]), "
                                                      "or a folder of clips with .txt captions")
    ap.add_argument("--out", required=True, help="output folder (created, or resumed when it holds a run)")
    ap.add_argument("--config", help="curation YAML (examples/configs/curate.yaml); defaults without it")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. thresholds.blur_min=60")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _skipped_record(row: dict) -> dict:
    """A folder's file that folder_manifest could not list, as a report line."""
    reason = row["reason"]
    if reason.startswith(("no caption", "empty caption")):
        kind = "no_caption"
    else:
        kind = ("no_video" if "no video stream" in reason else "zero_length" if "empty file" in reason
                else "undecodable")
    return {"id": row["id"], "path": row["path"], "caption": None, "keep": False, "reasons": [kind], "scenes": [],
            "crop": None, "motion": None, "duplicate_of": None, "measures": {}, "probe": None, "error": reason}


def entries_of(source: str, out: str, rank: int, barrier, progress: bool) -> tuple:
    """(manifest entries, report lines of files that could not be listed)."""
    if not os.path.exists(source):
        raise UserError(f"--manifest {source}: no such file or folder")
    if not os.path.isdir(source):
        return read_manifest(source), ()
    from megawan.data.folder_manifest import make_manifest

    listed = os.path.join(out, "input_manifest.jsonl")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        make_manifest(source, listed, progress=progress)
    if barrier is not None:
        barrier()
    with open(listed + ".skipped.jsonl", encoding="utf-8") as f:
        skipped = tuple(_skipped_record(json.loads(line)) for line in f if line.strip())
    entries = read_manifest(listed)
    return entries, tuple(r for r in skipped if r["id"] not in {e.id for e in entries})


def _main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_curate_config(args.config, tuple(args.overrides))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank, barrier = 0, None
    if world > 1:
        import torch.distributed as dist

        from megawan.parallel import initialize  # here: megatron loads in seconds, a one-process run never needs it

        initialize(backend="gloo")  # a barrier is all the ranks share: no NCCL, the GPUs stay free
        rank, world, barrier = dist.get_rank(), dist.get_world_size(), dist.barrier
    entries, skipped = entries_of(args.manifest, args.out, rank, barrier, not args.no_progress)
    from megawan.curation.runner import run_curation  # OpenCV and PySceneDetect load here, after the checks

    summary = run_curation(entries, args.out, cfg, rank, world, barrier, not args.no_progress, skipped)
    print(f"[rank {rank}] measured {summary['measured']} clips, already done {summary['already_done']}", flush=True)
    if rank == 0:
        print(f"kept {summary['kept']} of {summary['clips']} clips ({summary['scenes']} scenes in "
              f"{summary['manifest']}); reasons: {json.dumps(summary['reasons'])}", flush=True)
        print(f"report: {summary['report']}" + (f", {summary['html']}" if "html" in summary else ""), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    """0 done; 2 a user error (one line naming the field or file)."""
    return run_main("curate.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
