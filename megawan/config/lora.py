"""The `lora:` section of a run: fine-tune low-rank adapters on the block linears instead of every weight.

    lora:
      rank: 32                  # 0 (default): no LoRA, every weight trains
      alpha: 32                 # the update is scaled by alpha / rank; default: rank
      targets: [q, k, v, o, ffn.0, ffn.2]   # peft's target_modules, official / diffusers / megawan names;
                                            # default: every block linear (megawan.lora.targets)
      dropout: 0.0
      init: gaussian            # A ~ N(0, 1/rank), B = 0 (peft's "gaussian"); kaiming: peft's default
      init_from: null           # continue training a LoRA file (diffusers / peft or ComfyUI layout)

A LoRA run trains on top of the base weights of `checkpoint.init_from` (a megawan checkpoint, e.g. an official
release converted by tools/convert_checkpoint.py), which stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megawan.config.fields import checker

LORA_INITS = ("gaussian", "kaiming")


@dataclass
class LoRAConfig:
    rank: int = 0
    alpha: Optional[float] = None
    targets: Optional[tuple] = None
    dropout: float = 0.0
    init: str = "gaussian"
    init_from: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def validate(self, prefix: str = "lora") -> "LoRAConfig":
        need = checker(prefix)
        need(self.rank >= 0, "rank", f"must be 0 (no LoRA) or a positive rank, got {self.rank}")
        need(self.alpha is None or self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        need(self.init in LORA_INITS, "init", f"{self.init!r} is not one of {', '.join(LORA_INITS)}")
        need(self.targets is None or len(self.targets) > 0, "targets", "is empty: leave it unset for every linear")
        need(self.enabled or self.init_from is None, "init_from", "a LoRA file to continue needs lora.rank > 0")
        return self
