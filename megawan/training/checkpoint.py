"""Training checkpoints: model, optimizer, EMA (megatron-core dist_checkpointing, reshardable to any
TP / PP / CP / DP), plus the trainer's state (step, LR schedule, loader position, counters) and the resolved
config.

    <dir>/iter_0000100/          one directory per checkpoint (dist_checkpointing files + trainer_state.json
                                  + config.yaml)
    <dir>/latest                  the name of the newest complete one; moved last

A checkpoint is written under `iter_<step, 7 digits>.tmp` and renamed once every rank has finished; `latest` is
replaced atomically after that; older ones beyond `keep` are removed last. A job killed at any moment leaves
`latest` naming a complete checkpoint (or none), which is what a resume reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import torch
import yaml
from megatron.core import dist_checkpointing

from megawan.checkpointing import _barrier, _rank, _save_strategy

STATE_FILE = "trainer_state.json"
_ITER = re.compile(r"^iter_(\d{7})$")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # loads under any TP / PP / DP


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(root: str):
    """The directory `latest` names, if it is complete; None for a fresh run."""
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise RuntimeError(f"{pointer} names {name}, which is not a complete checkpoint (no {STATE_FILE})")
    return path


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run's checkpoint root (its `latest`): what --init-from accepts."""
    if os.path.isfile(os.path.join(path, "latest")):
        return latest_checkpoint(path)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run's checkpoint "
                                "directory (no `latest`)")
    return path


def model_sharded_state_dict(chunks: list) -> dict:
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_checkpoint(root: str, step: int, chunks: list, optimizer, trainer_state: dict, config: dict,
                    ema=None, keep: int = 3) -> str:
    """Collective: every rank calls it. Returns the final directory."""
    name = checkpoint_name(step)
    path, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):  # what killed saves left behind
            if stale.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        if os.path.exists(path):
            shutil.rmtree(path)  # a checkpoint of this step written by a run that died before moving `latest`
        os.makedirs(tmp)
    _barrier()
    model_sd = model_sharded_state_dict(chunks)
    sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)}
    if ema is not None:
        sharded["ema"] = ema.sharded_state_dict([model_sd[f"chunk{i}"] for i in range(len(chunks))])
    dist_checkpointing.save(sharded, tmp, sharded_strategy=_save_strategy(),
                            content_metadata=OPTIMIZER_METADATA)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=1)
        os.rename(tmp, path)
        pointer = os.path.join(root, "latest")
        with open(pointer + ".tmp", "w", encoding="utf-8") as f:
            f.write(name + "\n")
        os.replace(pointer + ".tmp", pointer)  # the commit
        complete = sorted(n for n in os.listdir(root) if _ITER.match(n))
        for old in complete[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return path


def _prepare_optimizer_for_load(optimizer) -> None:
    """Two gaps in megatron-core 0.16's DistributedOptimizer with torch's Adam (apex / TE's fused Adam, which
    megatron is mostly run with, take other paths):
    - state_dict() needs Adam's state to exist (torch creates it at the first step): a fresh optimizer gets
      megatron's own placeholder state (one zero-gradient step); the load overwrites every value of it.
    - the fully_reshardable load copies every key of torch's per-parameter state from the checkpoint, but
      the checkpoint holds param / exp_avg / exp_avg_sq only; Adam's `step` comes back through the param
      groups (megatron's load_state_dict sets it), so the per-parameter copy keeps that value.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
        if getattr(opt, "_megawan_step_kept", False) or not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            if "step" not in tensors:
                group_index, group_order = opt.model_param_group_index_map[model_param]
                main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
                step = opt.optimizer.state.get(main_param, {}).get("step")
                if step is not None:
                    tensors = {**tensors, "step": step}
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        opt._megawan_step_kept = True


def load_checkpoint(path: str, chunks: list, optimizer=None, ema=None) -> dict:
    """Load weights (and, when given, optimizer and EMA) from `path` into this rank's chunks under the current
    layout. Returns the trainer state. A warm start passes no optimizer and then calls the optimizer's
    reload_model_params() so that its fp32 main weights are the loaded ones."""
    from megawan.models.dit.parallelize import chunk_state_dict

    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        trainer_state = json.load(f)
    model_sd = model_sharded_state_dict(chunks)
    sharded = {"model": model_sd}
    if optimizer is not None:
        _prepare_optimizer_for_load(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    if ema is not None:
        sharded["ema"] = ema.sharded_state_dict([model_sd[f"chunk{i}"] for i in range(len(chunks))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = dist_checkpointing.load(sharded, path)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(chunk_state_dict(loaded["model"][f"chunk{i}"], chunk))
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            # megatron hands every parameter one shared `step` tensor; torch's Adam increments each
            # parameter's step in place, so a shared one would advance once per parameter per step
            for state in getattr(getattr(opt, "optimizer", None), "state", {}).values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
    if ema is not None:
        ema.load_loaded(loaded["ema"])
    return trainer_state
