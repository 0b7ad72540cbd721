#!/usr/bin/env python3
"""Plot a run's loss from its metrics.jsonl to a PNG: the training loss by step (raw, and a mean over a window
of steps), the held-out loss (val/loss) as markers, the learning rate on a second axis.

    python tools/plot_metrics.py runs/tiny/checkpoints/logs/metrics.jsonl --out loss.png [--smooth 100]

Steps logged more than once (a resumed run re-logs the steps after its checkpoint) keep their last value;
skipped (non-finite) steps are left out (megawan.training.loss_plot). Needs matplotlib:
pip install megawan[logging]. A missing or empty metrics file is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from megawan.training.loss_plot import load_curves, plot_loss
from megawan.utils.user_errors import run_main


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="metrics.jsonl of a run (<checkpoint.dir>/logs/metrics.jsonl)")
    ap.add_argument("--out", default="loss.png", help="the picture (PNG; another suffix: that format)")
    ap.add_argument("--smooth", type=int, default=None, metavar="STEPS",
                    help="mean over this many steps (default: about a twentieth of the run; 0: none)")
    args = ap.parse_args(argv)
    curves = load_curves(args.metrics)
    plot_loss(curves, args.out, args.smooth, title=args.metrics)
    val = f", held-out loss {curves.val_loss[-1]:.4f} at step {curves.val_steps[-1]}" if len(curves.val_steps) else ""
    print(f"{args.out}: steps {curves.steps[0]}..{curves.steps[-1]}, loss {curves.loss[0]:.4f} -> "
          f"{curves.loss[-1]:.4f}{val}")
    return 0


def main(argv=None) -> int:
    return run_main("plot_metrics.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
