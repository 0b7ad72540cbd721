#!/usr/bin/env python3
"""Export a VAE trained by `megawan train-vae`: the official Wan2.x_VAE.pth (+ vae_config.json) and / or diffusers'
AutoencoderKLWan folder (vae/), with the latent mean / std recomputed on a sample of the data.

    python tools/export_vae.py runs/vae/checkpoints --to both --out exported
    python tools/export_vae.py runs/vae/checkpoints/iter_0002000 --to official --out exported --ema \
        --stats clips.jsonl --stats-samples 256 --stats-buckets 17x256x256 1x256x256

    exported/Wan2.1_VAE.pth + vae_config.json     (Wan2.2_VAE.pth for a Wan2.2-architecture VAE)
    exported/vae/config.json + diffusion_pytorch_model.safetensors

Then: `tools/precompute_latents.py --vae exported/Wan2.1_VAE.pth --vae-config exported/vae_config.json ...`
(the store records the recomputed statistics), or `AutoencoderKLWan.from_pretrained("exported/vae")`.
Without --ema the checkpoint's EMA weights are exported where it has them (--no-ema: the trained weights).
"""

import argparse
import sys

from megawan.vae_export import TARGETS, export_vae
from megawan.utils.user_errors import run_main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="a train-vae checkpoint folder, or its run's checkpoint root (the latest)")
    ap.add_argument("--to", choices=TARGETS, default="both")
    ap.add_argument("--out", required=True, help="destination folder (the files written must not exist)")
    ema = ap.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="the EMA weights (refused when the checkpoint has none); default: EMA where present")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="the trained weights, not their EMA")
    ap.add_argument("--stats", metavar="MANIFEST", help="recompute latents_mean / latents_std on rows of this "
                                                        "manifest (default: keep the run config's)")
    ap.add_argument("--stats-samples", type=int, default=64, help="manifest rows used, evenly spread (default 64)")
    ap.add_argument("--stats-buckets", nargs="+", metavar="FxHxW",
                    help="buckets the rows are cut to (default: the run config's data.buckets)")
    ap.add_argument("--fps", type=float, default=16.0, help="sampling rate of video frames (a row's fps wins)")
    ap.add_argument("--decode-backend", default="auto", help="auto | pyav | dali-cpu | dali-gpu")
    return ap.parse_args(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    written = export_vae(args.ckpt, args.out, to=args.to, ema=args.ema, stats=args.stats,
                         stats_samples=args.stats_samples, stats_buckets=args.stats_buckets, fps=args.fps,
                         decode=args.decode_backend)
    for what in ("official", "vae_config", "diffusers"):
        if written[what]:
            print(f"{what}: {written[what]}")
    cfg = written["config"]
    print(f"latents_mean: {[round(v, 4) for v in cfg.latents_mean]}")
    print(f"latents_std: {[round(v, 4) for v in cfg.latents_std]}")
    return 0


def main(argv=None) -> int:
    """0 written; 2 a user error (one line naming the file or option)."""
    return run_main("export_vae.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
