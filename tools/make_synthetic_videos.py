#!/usr/bin/env python3
"""Make a synthetic video dataset of moving coloured shapes (caption: "a red circle moves left").

    python tools/make_synthetic_videos.py --out data/shapes --count 200 --frames 81 --size 64 --broken 10
"""

import argparse
import sys

from megawan.demo.shapes import write_synthetic_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--frames", type=int, default=81,
                    help="frames per clip (81: the video stage buckets' length; a shorter clip fits no bucket)")
    ap.add_argument("--size", type=int, default=64, help="height and width (or --height / --width)")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--fps", type=int, default=16)
    ap.add_argument("--broken", type=int, default=0, help="also write this many bad files (for tests)")
    ap.add_argument("--codec", default="libx264", help="libx264 (mp4) or libvpx-vp9 (webm)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    manifest = write_synthetic_dataset(args.out, args.count, args.frames, args.height or args.size,
                                       args.width or args.size, args.fps, args.broken, args.seed, args.codec)
    print(f"wrote {args.count} clips and {args.broken} broken files; manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
