"""A run's loss curve from its metrics.jsonl (tools/plot_metrics.py; the demo's <out>/loss.png).

    curves = load_curves("runs/x/checkpoints/logs/metrics.jsonl")
    plot_loss(curves, "loss.png", window=100)     # train loss (raw + a 100-step mean), val/loss, lr

The x axis is the training step the rows name (not the row count: logging every 10 steps, or a run resumed
from a checkpoint, would stretch it). A step logged more than once (a run resumed after a kill re-logs the
steps after its checkpoint; files from before the logger dropped those rows still hold both) keeps its last
value; a skipped step (non-finite loss, logged as null) is left out. The held-out loss (`val/loss`, written by
validation at its own steps) is drawn as markers on the same axes; the learning rate on a second axis.

Needs matplotlib (the `logging` extra: pip install megawan[logging]).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

from megawan.training.metrics import read_metrics
from megawan.utils.user_errors import UserError

INSTALL = "pip install megawan[logging]"


class Curves(NamedTuple):
    steps: np.ndarray  # training steps with a finite loss, increasing
    loss: np.ndarray
    lr: np.ndarray  # NaN where a row had none
    val_steps: np.ndarray  # steps of the held-out loss
    val_loss: np.ndarray


def load_curves(path: str) -> Curves:
    """The curves of one metrics.jsonl; a missing file, or one without a finite training loss, is a one-line
    error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such metrics file (a run writes <checkpoint.dir>/logs/metrics.jsonl)")
    last: dict = {}
    for row in read_metrics(path):
        if isinstance(row.get("step"), int):
            last.setdefault(row["step"], {}).update(row)  # later rows win; validation adds its keys to a step
    train = sorted(s for s, r in last.items() if _finite(r.get("loss")))
    if not train:
        raise UserError(f"{path}: no training loss logged yet (the first row comes at train.log_every steps)")
    val = sorted(s for s, r in last.items() if _finite(r.get("val/loss")))
    return Curves(np.array(train), np.array([last[s]["loss"] for s in train], dtype=float),
                  np.array([last[s]["lr"] if _finite(last[s].get("lr")) else np.nan for s in train], dtype=float),
                  np.array(val, dtype=int), np.array([last[s]["val/loss"] for s in val], dtype=float))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def smooth_over_steps(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """At each step s: the mean of the values logged at steps s - window < step <= s (a window in steps, so
    the curve means the same whatever train.log_every was). window <= 1: the values themselves."""
    if window <= 1 or len(values) == 0:
        return values.astype(float)
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    first = np.searchsorted(steps, steps - window, side="right")
    ends = np.arange(1, len(values) + 1)
    return (sums[ends] - sums[first]) / (ends - first)


def default_window(steps: np.ndarray) -> int:
    """About a twentieth of the steps plotted (1 for a short run)."""
    return max(1, int(steps[-1] - steps[0]) // 20) if len(steps) else 1


def plot_loss(curves: Curves, out: str, window: int | None = None, title: str = "") -> str:
    """Write the loss plot to `out` (PNG, or what its suffix names); returns `out`. window: the smoothing
    window in steps (None: default_window; 0 or 1: none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed (a login node, a container)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"plotting needs matplotlib: {INSTALL}") from None
    window = default_window(curves.steps) if window is None else window
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    smoothed = window > 1 and len(curves.steps) > 1
    ax.plot(curves.steps, curves.loss, color="tab:blue", alpha=0.3 if smoothed else 1.0, linewidth=1,
            label="train loss")
    if smoothed:
        ax.plot(curves.steps, smooth_over_steps(curves.steps, curves.loss, window), color="tab:blue", linewidth=2,
                label=f"train loss ({window}-step mean)")
    if len(curves.val_steps):
        ax.plot(curves.val_steps, curves.val_loss, color="tab:orange", marker="o", linestyle="--", markersize=6,
                label="held-out loss (val/loss)")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if np.isfinite(curves.lr).any():
        lr_axis = ax.twinx()
        lr_axis.plot(curves.steps, curves.lr, color="grey", linestyle=":", linewidth=1.5, label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
