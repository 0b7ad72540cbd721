#!/usr/bin/env python3
"""Precompute Wan-VAE latents and umT5 text states for a manifest of videos / images into a Zarr store.

    python tools/precompute_latents.py --manifest clips.jsonl --out latents.zarr \
        --vae Wan2.1_VAE.pth --vae-config wan2.1 \
        --text-encoder models_t5_umt5-xxl-enc-bf16.pth --text-config umt5-xxl --tokenizer google/umt5-xxl \
        --stage-buckets video-192 image-256
    python tools/precompute_latents.py ... --vae exported/Wan2.1_VAE.pth \
        --vae-config exported/vae_config.json    # a trained VAE (tools/export_vae.py): its latent statistics
    python tools/precompute_latents.py ... --conditioning i2v    # for Wan2.2 I2V-A14B training (video buckets)
    python tools/precompute_latents.py ... --conditioning flf2v \
        --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth  # Wan2.1 I2V / FLF2V: + CLIP tokens

    torchrun --nproc-per-node 8 tools/precompute_latents.py ...     # or under srun: one task per GPU

Each rank takes a disjoint slice of the manifest. Run it again after a kill: it does only what is missing.
Bad files are skipped and listed in OUT.skipped.jsonl with the reason.
"""

import argparse
import json
import os
import sys

from megawan.capabilities import rank_device
from megawan.data.buckets import STAGE_BUCKETS
from megawan.data.conditioning import KINDS
from megawan.data.precompute import STORE_DTYPES, PrecomputeJob, run_precompute
from megawan.utils.user_errors import UserError, run_main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True,
                    help="JSONL or CSV: path, caption[, start, end, fps, id]; or WebDataset shards: a quoted brace "
                         "pattern 'shards/{000000..000009}.tar', one .tar, or a folder of .tar (docs/data.md)")
    ap.add_argument("--out", required=True, help="the Zarr store (created, or resumed when it exists)")
    ap.add_argument("--vae", required=True, help="VAE weights (official .pth, diffusers or megawan safetensors)")
    ap.add_argument("--vae-config", default="wan2.1",
                    help="VAE preset (wan2.1, wan2.2, tiny-2.1, tiny-2.2) or an AutoencoderKLWan config.json / "
                         "vae_config.json (a trained VAE's export: the store records its latent statistics)")
    ap.add_argument("--text-encoder", required=True, help="umT5 weights (official .pth, transformers, megawan)")
    ap.add_argument("--text-config", default="umt5-xxl", help="text-encoder preset: umt5-xxl, tiny")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece model file or a folder with spiece.model")
    ap.add_argument("--stage-buckets", nargs="+",
                    help=f"bucket sets ({', '.join(sorted(STAGE_BUCKETS))}) and / or FRAMESxHEIGHTxWIDTH buckets "
                         "(default video-192 image-256; with --conditioning video-192)")
    ap.add_argument("--fps", type=float, default=16.0, help="sampling rate of video frames (a row's fps wins)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(STORE_DTYPES), help="stored latents / states")
    ap.add_argument("--compute-dtype", choices=sorted(STORE_DTYPES), help="encoders' dtype (CPU fp32, GPU bf16)")
    ap.add_argument("--save-logvar", action="store_true", help="also store the VAE posterior log-variance")
    ap.add_argument("--conditioning", choices=KINDS,
                    help="also store image conditioning for image-to-video training: i2v (first frame; Wan2.1 I2V, "
                         "Wan2.2 I2V-A14B) or flf2v (first and last frame; Wan2.1 FLF2V). Video buckets only")
    ap.add_argument("--clip", help="with --conditioning: CLIP image encoder weights (Wan2.1 I2V / FLF2V need its "
                                   "tokens: models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, transformers' "
                                   "CLIPVisionModel or megawan's image_encoder.safetensors)")
    ap.add_argument("--clip-config", help="CLIP preset (default: the one the weights fit)")
    ap.add_argument("--decode-workers", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=8, help="clips decoded ahead of the encoders")
    ap.add_argument("--decode-backend", default="auto",
                    help="auto (DALI on the rank's GPU where there is one, else PyAV) | pyav (every codec) | "
                         "dali-cpu (VP8 / VP9 / MJPEG) | dali-gpu (NVDEC, decoded and resized on the rank's GPU)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """0 done; 2 a user error (one line: a bad option, manifest row or weight file; MEGAWAN_DEBUG=1 shows the
    traceback)."""
    return run_main("precompute_latents.py", _main, argv)


def check_files(args) -> None:
    """Every file named on the command line is there, before minutes go into loading the encoders: a typo in
    --tokenizer is one line naming it, not an error after the VAE and umT5 have loaded."""
    named = [("--manifest", args.manifest), ("--vae", args.vae), ("--text-encoder", args.text_encoder),
             ("--tokenizer", args.tokenizer), ("--clip", args.clip)]
    for flag, path in named:
        if flag == "--manifest" and any(c in path for c in "{*?["):
            continue  # a pattern (shards), expanded by the manifest reader
        if path is not None and not os.path.exists(path):
            raise UserError(f"{flag} {path}: no such file or folder")


def _main(argv=None) -> int:
    args = parse_args(argv)
    buckets = args.stage_buckets or (["video-192"] if args.conditioning else ["video-192", "image-256"])
    job = PrecomputeJob(manifest=args.manifest, out=args.out, vae=args.vae, vae_config=args.vae_config,
                        text_encoder=args.text_encoder, text_config=args.text_config, tokenizer=args.tokenizer,
                        buckets=buckets, fps=args.fps, dtype=args.dtype, compute_dtype=args.compute_dtype,
                        save_logvar=args.save_logvar, decode_workers=args.decode_workers, prefetch=args.prefetch,
                        decode_backend=args.decode_backend, conditioning=args.conditioning, clip=args.clip,
                        clip_config=args.clip_config)
    job.check()  # a bad bucket, or a decode backend this machine cannot run, fails here before any work
    check_files(args)  # then the files, before the encoders load
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank, barrier, device = 0, None, None
    if world > 1:
        import torch.distributed as dist

        # here, not at the top: megawan.parallel loads megatron (seconds), which a one-process run never needs
        from megawan.parallel import initialize

        initialize()  # torchrun or srun; every rank is its own data-parallel worker
        rank, world, barrier = dist.get_rank(), dist.get_world_size(), dist.barrier
        device = rank_device()  # initialize() gave this rank its GPU (LOCAL_RANK), when there is one
    summary = run_precompute(job, rank=rank, world_size=world, barrier=barrier, device=device,
                             progress=not args.no_progress)
    print(f"[rank {rank}] wrote {summary['written']} clips ({summary['clips_per_s']:.2f} clips/s), "
          f"skipped {summary['skipped_now']}, already done {summary['already_done']}", flush=True)
    if rank == 0:
        print("store:", json.dumps(summary["store"]), flush=True)
        print(f"skipped files: {len(summary['skipped'])} (reasons in {args.out.rstrip('/')}.skipped.jsonl)", flush=True)
        for row in summary["skipped"]:
            print(f"  {row['id']}: {row['path']}: {row['reason']}", flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
