"""Metrics sinks on the logging rank: JSONL (always), TensorBoard (when installed and enabled), W&B (when a
project is configured and wandb is installed).

    log = MetricsLogger("runs/x/logs", tensorboard=True, wandb_project=None, config=cfg_dict, step=resumed_step)
    log.write(step, {"loss": 0.12, "lr": 1e-4})
    log.close()

A run resumed at step S (after a kill, a pre-emption, a torchrun restart) computes steps S+1, ... again: the
rows that the stopped run logged for them are dropped from metrics.jsonl when the logger opens, so the file
holds each step once, the one of the run that carried on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

logger = logging.getLogger("megawan")


class MetricsLogger:
    def __init__(self, directory: str, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, enabled: bool = True, step: int = 0):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        _drop_rows_after(self.path, step)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(directory, "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed: metrics go to %s only", self.path)
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config or {}, dir=directory, resume="allow")
            except ImportError:
                logger.warning("wandb is not installed: metrics go to %s only", self.path)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                                      for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl. A last line without its newline is one being written now (or cut by a
    kill mid-write): it is not a row yet."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def _drop_rows_after(path: str, step: int) -> None:
    """Keep the rows of steps <= `step` (the ones the resumed run does not compute again). The file is replaced
    whole (a new file renamed over it), so a kill here leaves either the old rows or the kept ones."""
    if not os.path.exists(path):
        return
    kept = read_metrics(path)
    kept = [r for r in kept if r.get("step", 0) <= step]
    with open(path, encoding="utf-8") as f:
        if sum(1 for _ in f) == len(kept):
            return  # nothing to drop (a fresh or cleanly stopped run): no rewrite
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    logger.info("%s: dropped the rows of steps after %d, which this run computes again", path, step)
