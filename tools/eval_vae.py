#!/usr/bin/env python3
"""Score VAEs on held-out clips: PSNR, SSIM and LPIPS of their reconstructions, per bucket (resolution x length)
and overall, side by side; reconstructions as mp4 and side-by-side PNG strips.

    python tools/eval_vae.py --vae trained=runs/vae/checkpoints --vae official=Wan2.1_VAE.pth \
        --manifest held_out.jsonl --buckets 17x256x256 1x256x256 --out eval \
        --lpips-vgg vgg16-397923af.pth --lpips-lin lpips_vgg_v0.1.pth

Each --vae ([LABEL=]PATH) is a train-vae checkpoint or run root (EMA weights where present; --no-ema: the trained
ones), an official / megawan .pth or .safetensors (preset detected, or the vae_config.json beside it) or a
diffusers AutoencoderKLWan folder. Every manifest row is cut to every bucket it fills (a video: each video bucket
no longer than it and, from its first frame, each image bucket). Written to --out: results.json, table.txt,
media/<clip>@<bucket>/ (original + one file per VAE) and strips/<clip>@<bucket>.png for the first --media samples.
LPIPS needs torchvision's VGG16 weights and the LPIPS repo's linear heads (docs/vae_training.md says where).
"""

import argparse
import sys

import torch

from megawan.data.eval_clips import eval_clips
from megawan.utils.user_errors import UserError, run_main
from megawan.vae_eval import compare_vaes, format_table, load_any_vae


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", action="append", required=True, metavar="[LABEL=]PATH", help="a VAE (repeatable)")
    ap.add_argument("--manifest", required=True, help="held-out clips: JSONL or CSV (path, caption[, start, end, fps])")
    ap.add_argument("--buckets", nargs="+", required=True, metavar="FxHxW", help="e.g. 17x256x256 1x256x256")
    ap.add_argument("--out", required=True, help="folder for results.json, table.txt, media/, strips/")
    ap.add_argument("--limit", type=int, help="use this many manifest rows, evenly spread (default: all)")
    ap.add_argument("--media", type=int, default=4, help="samples written as media and strips (default 4)")
    ap.add_argument("--lpips-vgg", help="torchvision's vgg16-397923af.pth (.pth or .safetensors)")
    ap.add_argument("--lpips-lin", help="the LPIPS repo's weights/v0.1/vgg.pth (.pth or .safetensors)")
    ap.add_argument("--no-ema", dest="ema", action="store_false", default=None,
                    help="train-vae checkpoints: the trained weights, not their EMA")
    ap.add_argument("--fps", type=float, default=16.0, help="sampling rate of video frames (a row's fps wins)")
    ap.add_argument("--decode-backend", default="auto", help="auto | pyav | dali-cpu | dali-gpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if (args.lpips_vgg is None) != (args.lpips_lin is None):
        raise UserError("--lpips-vgg and --lpips-lin go together (LPIPS needs both files)")
    lpips = None
    if args.lpips_vgg:
        from megawan.models.vae.lpips import LPIPS

        lpips = LPIPS.from_files(args.lpips_vgg, args.lpips_lin, fields=("--lpips-vgg", "--lpips-lin")).to(args.device)
    vaes, sources = {}, {}
    for spec in args.vae:
        label, vae = load_any_vae(spec, device=args.device, ema=args.ema)
        while label in vaes:
            label += "'"
        vaes[label], sources[label] = vae, spec
    strides = {v.vae_config.temporal_stride for v in vaes.values()}
    clips, skipped = eval_clips(args.manifest, args.buckets, fps=args.fps, limit=args.limit,
                                decode=args.decode_backend, temporal_stride=max(strides))
    print(f"{len(clips)} samples from {len({c['id'] for c in clips})} clips ({len(skipped)} rows skipped)")
    for row in skipped:
        print(f"  skipped {row['id']}: {row['path']}: {row['reason']}")
    results = compare_vaes(vaes, clips, args.out, lpips=lpips, media=args.media, fps=round(args.fps),
                           sources=sources, skipped=skipped)
    print(format_table(results))
    print(f"results: {args.out}/results.json; strips: {args.out}/strips/")
    return 0


def main(argv=None) -> int:
    """0 done; 2 a user error (one line naming the file or option)."""
    return run_main("eval_vae.py", _main, argv, also=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
