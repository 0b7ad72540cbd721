"""LoRA fine-tuning in the trainer (the run's `lora:` section): adapters on frozen base weights.

    check_lora(cfg)                                  # preflight: targets, the base, the LoRA file to continue
    base = add_adapters(chunks, base_path, cfg.lora) # the base loaded, then adapters on every chunk
    check_resume(read_trainer_state(latest), base)   # a resumed run trains on the base it started on

Order in Trainer._setup: build the chunks, load the base weights of checkpoint.init_from (verified like a warm
start), add the adapters (their seed is the model's init seed, which every chunk and TP rank shares, so any
layout starts from the same adapters), then recompute / offload, then megatron's DDP and distributed optimizer:
DDP gives only parameters that require a gradient a buffer, so the frozen base has no gradient, no fp32 main
copy and no optimizer state, and the EMA averages the adapters only. Checkpoints hold the adapters and their
optimizer / EMA state (megawan.checkpoint, "lora_base" in the trainer state) and name the base by its
fingerprint; a resume reloads the base from checkpoint.init_from and refuses another one.
"""

from __future__ import annotations

import os

from megawan.checkpoint import (LORA_BASE, is_lora_checkpoint, load_checkpoint, read_trainer_state,
                                weights_fingerprint)
from megawan.checkpoint_integrity import UNVERIFIED, CheckpointError, verify_checkpoint
from megawan.config import ConfigError, RunConfig
from megawan.config.lora import LoRAConfig
from megawan.lora import apply_lora, load_lora
from megawan.lora.targets import select_linears


def check_lora(cfg: RunConfig, base: str | None) -> None:
    """Preflight, before any rank starts: the targets name linears of this model, the resolved base checkpoint
    `base` is a full one (not a LoRA run's), the LoRA file to continue exists."""
    if base is not None and is_lora_checkpoint(base):
        named = read_trainer_state(base)[LORA_BASE]["path"]
        raise ConfigError(f"checkpoint.init_from: {base} is a LoRA run's checkpoint (adapters only); name the "
                          f"base weights it was trained on ({named})")
    if not cfg.lora.enabled:
        return
    try:
        select_linears(cfg.lora.targets, image_branch=cfg.model.image_dim is not None)
    except ValueError as e:  # the message names lora.targets and the known names
        raise ConfigError(str(e)) from None
    if cfg.lora.init_from and not os.path.isfile(cfg.lora.init_from):
        raise ConfigError(f"lora.init_from: {cfg.lora.init_from} is not a file")


def add_adapters(chunks: list, base: str, lora: LoRAConfig) -> dict:
    """Collective: load checkpoint `base` (a resolved checkpoint folder; its checksums verified by every rank's
    share) into `chunks`, then add lora's adapters to every chunk, freezing the rest; with lora.init_from the
    adapters start from that LoRA file. Returns the trainer state's "lora_base": {"path", "fingerprint"}."""
    verdict = verify_checkpoint(base, collective=True)  # named by the user: no fallback
    if verdict not in (None, UNVERIFIED):
        raise CheckpointError(f"checkpoint.init_from: {base} is damaged: {verdict}")
    load_checkpoint(base, chunks)  # before the adapters: the base checkpoint has none
    for chunk in chunks:  # seed: the model's init seed (default), the same on every chunk and rank
        apply_lora(chunk, lora.rank, alpha=lora.alpha, targets=lora.targets, dropout=lora.dropout, init=lora.init)
    for chunk in (chunks if lora.init_from else ()):  # continue a LoRA file: it must cover these adapters
        load_lora(chunk, lora.init_from)
    return {"path": os.path.abspath(base), "fingerprint": weights_fingerprint(base)}


def check_resume(state: dict, base: dict | None, folder: str) -> None:
    """The checkpoint `folder` (trainer state `state`) a run resumes from was trained as this run trains: a LoRA
    run's on the same base (`base`: add_adapters' result), a full run's without LoRA."""
    saved = state.get(LORA_BASE)
    if base is None and saved is not None:
        raise CheckpointError(f"{folder} is a LoRA run's checkpoint (adapters on {saved['path']}): resume it with "
                              "its lora: section and checkpoint.init_from")
    if base is not None and saved is None:
        raise CheckpointError(f"{folder} is a full training run's checkpoint: a LoRA run (lora.rank > 0) cannot "
                              "resume it; use another checkpoint.dir")
    if base is not None and saved["fingerprint"] != base["fingerprint"]:
        raise CheckpointError(f"checkpoint.init_from: {base['path']} (fingerprint {base['fingerprint']}) is not the "
                              f"base the LoRA checkpoint {folder} was trained on: {saved['path']} (fingerprint "
                              f"{saved['fingerprint']})")
