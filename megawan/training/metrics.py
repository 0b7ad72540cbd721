"""Metrics sinks on the logging rank: JSONL (always), TensorBoard (when installed and enabled), W&B (when a
project is configured and wandb is installed).

    log = MetricsLogger("runs/x/logs", tensorboard=True, wandb_project=None, config=cfg_dict)
    log.write(step, {"loss": 0.12, "lr": 1e-4})
    log.close()
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
                 config: dict | None = None, enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
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
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
