#!/usr/bin/env python3
"""Plot a run's loss (and learning rate) from its metrics.jsonl to a PNG.

    python tools/plot_metrics.py runs/tiny/checkpoints/logs/metrics.jsonl --out loss.png [--smooth 20]

Steps logged more than once (a resumed run re-logs the steps after its checkpoint) keep their last value;
skipped (non-finite) steps are left out. Uses matplotlib when installed, else draws the curve with PIL.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from megawan.training.metrics import read_metrics


def load_curve(path: str) -> tuple:
    last = {}
    for row in read_metrics(path):
        last.setdefault(row["step"], {}).update(row)  # validation writes its own row at a step
    steps = sorted(s for s, r in last.items() if r.get("loss") is not None)
    return np.array(steps), np.array([last[s]["loss"] for s in steps]), np.array([last[s].get("lr") or 0 for s in steps])


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot(steps, loss, lr, out: str, window: int = 1, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(steps, loss, out, window)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, alpha=0.3, label="loss")
    if window > 1 and len(loss) >= window:
        ax.plot(steps[window - 1:], smooth(loss, window), label=f"loss ({window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    if lr.any():
        ax2 = ax.twinx()
        ax2.plot(steps, lr, color="grey", linestyle=":", label="lr")
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_pil(steps, loss, out, window):
    from PIL import Image, ImageDraw

    w, h, m = 800, 450, 40
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    y = smooth(loss, window)
    x = steps[len(steps) - len(y):]
    lo, hi = float(y.min()), float(y.max()) or 1.0
    span_x = max(float(x[-1] - x[0]), 1.0)
    points = [(m + (xi - x[0]) / span_x * (w - 2 * m), h - m - (yi - lo) / max(hi - lo, 1e-12) * (h - 2 * m))
              for xi, yi in zip(x, y)]
    draw.rectangle([m, m, w - m, h - m], outline="black")
    if len(points) > 1:
        draw.line(points, fill="steelblue", width=2)
    draw.text((m, 10), f"loss {lo:.4g} .. {hi:.4g}, steps {int(x[0])} .. {int(x[-1])}", fill="black")
    image.save(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="metrics.jsonl of a run")
    ap.add_argument("--out", default="loss.png")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")
    args = ap.parse_args(argv)
    steps, loss, lr = load_curve(args.metrics)
    if len(steps) == 0:
        print(f"{args.metrics}: no finite losses logged", file=sys.stderr)
        return 1
    plot(steps, loss, lr, args.out, args.smooth, title=args.metrics)
    print(f"{args.out}: {len(steps)} steps, loss {loss[0]:.4f} -> {loss[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
