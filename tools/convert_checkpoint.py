#!/usr/bin/env python3
"""Convert a whole Wan pipeline (DiT or both A14B experts, Wan-VAE, umT5, tokenizer, configs) between the
official Wan layout, diffusers' WanPipeline layout and megawan's sharded format.

    # official release -> megawan, written by a TP2 x PP2 world (loads at any layout; --init-from takes it)
    python tools/convert_checkpoint.py --src Wan2.1-T2V-14B --src-format official \
        --dst wan14b-megawan --dst-format megawan --model wan2.1-t2v-14b --tp 2 --pp 2
    # a trained run (its EMA weights) -> official and diffusers
    python tools/convert_checkpoint.py --src runs/stage3/checkpoints --src-format megawan --encoders weights \
        --ema --dst export-official --dst-format official
    python tools/convert_checkpoint.py --src wan14b-megawan --src-format megawan --dst wan14b-diffusers \
        --dst-format diffusers
    # a LoRA merged into the weights on the way (repeatable; FILE:SCALE, default scale 1)
    python tools/convert_checkpoint.py --src Wan2.1-T2V-1.3B --src-format official --dst styled --dst-format \
        diffusers --merge-lora style.safetensors:0.8 --merge-lora detail.safetensors
    # the adapters of a LoRA training run as a LoRA file ComfyUI / diffusers load (--ema: their average)
    python tools/convert_checkpoint.py --src runs/lora/checkpoints --src-format megawan --lora-out style.safetensors \
        --lora-format comfyui

The DiT streams tensor by tensor (never two copies of a 14B model in memory); tensors are never cast, so
bf16 stays bf16 and a round trip is bit-exact. Keys or shapes that do not fit the model are refused with
the key named. Loading never unpickles objects (safetensors, or torch.load with weights_only=True).
"""

import argparse
import sys

from megawan.export import FORMATS, convert_pipeline, export_lora_checkpoint
from megawan.lora.formats import FORMATS as LORA_FORMATS, lora_argument
from megawan.utils.user_errors import run_main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="source folder (or a training checkpoint for megawan)")
    ap.add_argument("--src-format", required=True, choices=FORMATS)
    ap.add_argument("--dst", help="destination folder (new)")
    ap.add_argument("--dst-format", choices=FORMATS)
    ap.add_argument("--model", help="the model preset (e.g. wan2.1-t2v-14b, wan2.2-t2v-a14b); default: from "
                                    "config.json / the checkpoint")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size a megawan destination is written at")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size a megawan destination is written at")
    ap.add_argument("--encoders", help="folder with the VAE, umT5 and tokenizer when the source lacks them "
                                       "(a training checkpoint)")
    ap.add_argument("--ema", action="store_true", help="a megawan training checkpoint: export its EMA weights")
    ap.add_argument("--boundary", type=float, help="A14B: the expert switch t/1000 (default: the --model preset's)")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="official / diffusers shard size")
    ap.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="merge a LoRA file (diffusers or ComfyUI layout) into the DiT: W += SCALE alpha / rank B A "
                         "(repeatable; SCALE default 1)")
    ap.add_argument("--lora-out", help="instead of --dst: write the adapters of a LoRA training checkpoint (--src, "
                                       "--src-format megawan) to this .safetensors file")
    ap.add_argument("--lora-format", default="diffusers", choices=LORA_FORMATS,
                    help="--lora-out's layout: diffusers (WanPipeline.load_lora_weights) or comfyui (kohya names)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines (one per DiT tensor written)")
    return ap.parse_args(argv)



def main(argv=None) -> int:
    """0 done; 2 a user error (one line naming the file or key; MEGAWAN_DEBUG=1 shows the traceback)."""
    # conversion's checks raise plain ValueError / KeyError naming the key or shape that does not fit
    return run_main("convert_checkpoint", _main, argv, also=(ValueError, KeyError))


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.lora_out:
        if args.src_format != "megawan" or args.dst or args.merge_lora:
            raise ValueError("--lora-out writes the adapters of a megawan LoRA training checkpoint: give it with "
                             "--src-format megawan, without --dst / --merge-lora")
        path = export_lora_checkpoint(args.src, args.lora_out, args.lora_format, ema=args.ema)
        print(f"wrote {args.lora_format} LoRA file {path}")
        return 0
    if not args.dst or not args.dst_format:
        raise ValueError("give --dst and --dst-format (or --lora-out FILE for a LoRA training checkpoint)")
    loras = tuple(lora_argument(text, "--merge-lora") for text in args.merge_lora)
    summary = convert_pipeline(args.src, args.src_format, args.dst, args.dst_format, model=args.model,
                               tp=args.tp, pp=args.pp, encoders=args.encoders, ema=args.ema,
                               max_shard_bytes=int(args.shard_gb * 1024 ** 3), boundary=args.boundary, loras=loras,
                               progress=not args.no_progress)
    print(f"wrote {summary['format']} pipeline of {summary['config']} ({', '.join(summary['experts'])}) "
          f"to {summary['dst']}" + (f" at TP{summary['tp']} x PP{summary['pp']}" if summary["format"] == "megawan" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
