"""THE checkpoint format: megatron-core dist_checkpointing folders (model, distributed optimizer, EMA;
reshardable to any TP / PP / CP / DP), the trainer's state and the run config beside them. This is the only
module that knows the names on disk; the trainer, generation, export, tools and tests call it.

    <root>/iter_0000100/          one folder per checkpoint: dist_checkpointing files (model under `model.`,
                                  optimizer, EMA under `ema.`) + trainer_state.json + config.yaml (the run config)
    <root>/latest                 the name of the newest complete one; moved last

    save_checkpoint(root, step, chunks, optimizer, trainer_state, config, ema=ema)   # collective
    state = load_checkpoint(latest_checkpoint(root), chunks, optimizer, ema)       # any layout
    load_weights(resolve_checkpoint(path), [model], ema=has_ema(path))             # inference
    save_model_checkpoint(folder, chunks, config, trainer_state)                   # weights only (export)
    CheckpointTensors(folder).get(key)                                             # one tensor, no process group
    is_lora_checkpoint(folder); weights_fingerprint(base)                          # LoRA runs (below)
    saver = CheckpointSaver(async_save=True); saver.save(root, step, ...)           # written in the background
    saver.finalize()  # each step, collective: commits a finished write;  saver.close() waits for it

A checkpoint is written under `<name>.tmp` and renamed once every rank has finished and recorded its files'
sizes and checksums (megawan.checkpoint_integrity); `latest` is replaced atomically after that; older ones
beyond `keep` are removed last. A job killed at any moment leaves `latest` naming a complete checkpoint (or
none), which is what a resume reads; a reader never sees a half-written folder. Damage after the write (a
truncated, deleted or changed file) is found by resume_checkpoint, which falls back to the newest intact one.
A background write (CheckpointSaver) keeps these guarantees: the rename and `latest` happen in the collective
finalize, after every rank's writer has finished.

LoRA runs: a trainer state with "lora_base" ({"path", "fingerprint"} of the frozen base checkpoint) makes the
checkpoint adapter-only: its model tensors are the adapters' (`...linear_q_lora.lora_A` / `.lora_B`), its optimizer
and EMA state theirs; loading it fills only the adapters (the base comes from lora_base.path, loaded first).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader

from megawan.capabilities import cuda_available, rank_device
from megawan.checkpoint_integrity import (UNVERIFIED, CheckpointError, recorded_files, verify_checkpoint,
                                          write_manifests)
from megawan.checkpoint_strategy import save_strategy
from megawan.lora.apply import is_lora_parameter
from megawan.models.dit.parallelize import chunk_state_dict
from megawan.utils.processes import run_dying_with_parent

STATE_FILE = "trainer_state.json"  # step, LR schedule, loader position, counters
CONFIG_FILE = "config.yaml"  # the run config the checkpoint was trained with
LATEST = "latest"  # names the newest complete checkpoint of a root
EMA_PREFIX = "ema."  # the EMA's tensors: `ema.<model key>`
LORA_BASE = "lora_base"  # trainer state of a LoRA run: {"path", "fingerprint"} of its base; tensors: adapters only
_ITER = re.compile(r"^iter_(\d{7})$")
_OPTIMIZER_PREFIX = "optimizer"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # loads under any TP / PP / DP


# ----------------------------------------------------------------------------------------------
# Names and folders


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def checkpoint_step(path: str) -> int:
    """The step a checkpoint folder's name carries (iter_0000100 -> 100)."""
    m = _ITER.match(os.path.basename(os.path.normpath(path)))
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (iter_<7 digits>)")
    return int(m.group(1))


def is_checkpoint(path: str) -> bool:
    """A complete checkpoint folder (its trainer state is written last, just before the rename)."""
    return os.path.isfile(os.path.join(path, STATE_FILE))


def latest_checkpoint(root: str) -> Optional[str]:
    """The folder `latest` names, if it is complete; None for a fresh run."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not is_checkpoint(path):
        raise CheckpointError(f"{pointer} names {name}, which is not a complete checkpoint (no {STATE_FILE})")
    return path


def resume_checkpoint(root: str, on_corrupt: str = "fallback") -> tuple:
    """(the checkpoint a resume loads or None for a fresh run, notes to log). Collective: every rank checks a
    share of the files and all agree. The one `latest` names is verified first; when damaged, on_corrupt
    'fallback' tries the older ones, newest first (each damaged one gets a note naming its file), 'fail'
    raises CheckpointError naming the file. Raises CheckpointError too when no checkpoint is intact."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None, []
    with open(pointer, encoding="utf-8") as f:
        newest = checkpoint_step(f.read().strip())
    older = sorted((int(m.group(1)) for m in map(_ITER.match, os.listdir(root)) if m), reverse=True)
    notes = []
    for step in [newest] + [s for s in older if s < newest]:
        path = os.path.join(root, checkpoint_name(step))
        verdict = verify_checkpoint(path, collective=True)
        if verdict in (None, UNVERIFIED) and not is_checkpoint(path):
            verdict = f"{STATE_FILE} is missing"
        if verdict in (None, UNVERIFIED):
            if verdict == UNVERIFIED:
                notes.append(f"{path} is unverified (written before checkpoints had checksums)")
            return path, notes
        if on_corrupt == "fail":
            raise CheckpointError(f"checkpoint {path} is damaged: {verdict} (checkpoint.on_corrupt: fail)")
        notes.append(f"warning: checkpoint {path} is damaged ({verdict}); falling back to an older one")
    raise CheckpointError(f"no intact checkpoint in {root}: {notes[-1] if notes else 'none found'}")


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run's checkpoint root (its `latest`): what --init-from and --ckpt accept.
    Checked on this rank alone, cheaply (file names and sizes, no checksums): a missing or truncated file is a
    CheckpointError naming it, not a failure deep inside megatron. load_weights checks the checksums."""
    if os.path.isfile(os.path.join(path, LATEST)):
        path = latest_checkpoint(path)
    elif not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run's checkpoint "
                                f"directory (no `{LATEST}`)")
    _check_present(path, verify_checkpoint(path, sizes_only=True))
    return path


# dist_checkpointing's own files: without them megatron fails with an error that names none of them (a missing
# common.pt: "'str' object has no attribute 'iterdir'"). Checked by name, also in checkpoints with no manifests.
_DIST_FILES = (".metadata", "common.pt", "metadata.json")


def _check_present(path: str, verdict: Optional[str]) -> None:
    """Raise CheckpointError naming the damage (`verdict` of verify_checkpoint) or a missing file of `path`."""
    if verdict in (None, UNVERIFIED):
        missing = [n for n in (STATE_FILE, CONFIG_FILE) + _DIST_FILES if not os.path.isfile(os.path.join(path, n))]
        verdict = f"{missing[0]} is missing" if missing else None
    if verdict is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {verdict}")


def _prunable(root: str, keep: int) -> list:
    """The checkpoint folders of `root` older than its newest `keep` intact ones: a damaged checkpoint (a file
    missing or truncated: sizes only, a stat each) does not count toward `keep`, so it never displaces a good
    one. Fewer than `keep` intact: nothing."""
    complete = sorted(n for n in os.listdir(root) if _ITER.match(n))
    intact = [n for n in complete if verify_checkpoint(os.path.join(root, n), sizes_only=True) in (None, UNVERIFIED)
              and is_checkpoint(os.path.join(root, n))]
    return [n for n in complete if n < intact[-keep]] if len(intact) >= keep else []


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def read_run_config(path: str) -> dict:
    """The run config (a plain dict: model, train, ...) saved beside checkpoint `path`."""
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        return yaml.safe_load(f)


def is_lora_checkpoint(path: str) -> bool:
    """Whether checkpoint `path` is a LoRA run's: adapters (and their optimizer / EMA state) only."""
    return LORA_BASE in read_trainer_state(path)


def weights_fingerprint(path: str) -> str:
    """A cheap identity of checkpoint `path`'s contents: sha256 over the sizes and checksums its manifests record
    (no file is read); for a checkpoint written before manifests, over its files' names and sizes."""
    files = recorded_files(path)
    if files is None:
        files = {os.path.relpath(os.path.join(d, n), path): [os.path.getsize(os.path.join(d, n))]
                 for d, _, names in os.walk(path) for n in names}
    return "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _tensor_metadata(path: str) -> dict:
    return FileSystemReader(path).read_metadata().state_dict_metadata


def has_ema(path: str) -> bool:
    """Whether checkpoint `path` holds EMA weights."""
    return any(k.startswith(EMA_PREFIX) for k in _tensor_metadata(path))


# ----------------------------------------------------------------------------------------------
# Writing


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_ranks_agree(ok: bool) -> bool:
    """Collective: True when `ok` holds on every rank (a MIN all-reduce on the rank's device)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int, device=rank_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def model_sharded_state_dict(chunks: list, adapters_only: bool = False) -> dict:
    """The chunks' dist_checkpointing entries (adapters_only: a LoRA run's, the frozen base left out)."""
    return {f"chunk{i}": {k: v for k, v in chunk.sharded_state_dict().items()
                          if not adapters_only or is_lora_parameter(k)} for i, chunk in enumerate(chunks)}


def _begin(path: str) -> str:
    """Collective: an empty `path`.tmp to write into (a killed save's is removed first)."""
    tmp = path + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        os.makedirs(tmp)
    _barrier()
    return tmp


def _commit(tmp: str, path: str, config_text: str, state_text: str) -> None:
    """Collective, once every rank's tensors are in `tmp`: run config + trainer state (rank 0), each rank's
    manifest of sizes and checksums, then -- only when every rank reports its manifest written -- the rename
    that makes `path` visible. A rank that failed makes every rank raise (no rename)."""
    if _rank() == 0:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(config_text)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            f.write(state_text)
    _barrier()
    error = None
    try:
        write_manifests(tmp)  # every file's size and checksum, before the folder can be seen under its name
    except OSError as e:
        error = e
    if not _all_ranks_agree(error is None):
        raise CheckpointError(f"checkpoint {path}: a rank could not record its manifest"
                              + (f" ({error})" if error else "") + f"; {tmp} is left unfinished")
    if _rank() == 0:
        os.rename(tmp, path)
    _barrier()


def _texts(config: dict, trainer_state: dict) -> tuple:
    """The run config and trainer state as the text written beside the tensors, fixed now: a background
    write finishes steps later, when the trainer's dicts (loader position, scheduler) have moved on."""
    return yaml.safe_dump(config, sort_keys=False), json.dumps(trainer_state, indent=1)


def _write(path: str, sharded: dict, config: dict, trainer_state: dict, content_metadata=None) -> None:
    """Collective: `sharded` (dist_checkpointing) + config + trainer state into `path`, via `path`.tmp.
    `path` must not exist; the caller has created nothing."""
    tmp = _begin(path)
    dist_checkpointing.save(sharded, tmp, sharded_strategy=save_strategy(), content_metadata=content_metadata)
    _barrier()
    _commit(tmp, path, *_texts(config, trainer_state))


def _prepare_root(root: str, path: str) -> None:
    """Rank 0 removes what killed saves left behind (`.tmp` folders; a folder of this very step written by a
    run that died before moving `latest`). Only called when no save is in flight."""
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):
            if stale.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        if os.path.exists(path):
            shutil.rmtree(path)


def _training_sharded(chunks: list, optimizer, ema, trainer_state: Optional[dict] = None) -> dict:
    model_sd = model_sharded_state_dict(chunks, adapters_only=LORA_BASE in (trainer_state or {}))
    sharded = {"model": model_sd, _OPTIMIZER_PREFIX: optimizer.sharded_state_dict(model_sd,
                                                                                  metadata=OPTIMIZER_METADATA)}
    if ema is not None:
        sharded["ema"] = ema.sharded_state_dict([model_sd[f"chunk{i}"] for i in range(len(chunks))])
    return sharded


def _move_latest(root: str, name: str, keep: int) -> None:
    """Collective: rank 0 points `latest` at `name` (atomically: the commit) and removes complete checkpoints
    beyond the newest `keep`."""
    if _rank() == 0:
        pointer = os.path.join(root, LATEST)
        with open(pointer + ".tmp", "w", encoding="utf-8") as f:
            f.write(name + "\n")
        os.replace(pointer + ".tmp", pointer)  # the commit
        for old in _prunable(root, keep):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()


def save_checkpoint(root: str, step: int, chunks: list, optimizer, trainer_state: dict, config: dict,
                    ema=None, keep: int = 3) -> str:
    """Model, optimizer, EMA (when given), trainer state and run config as `<root>/iter_<step>`; then `latest`
    names it and checkpoints beyond the newest `keep` are removed. Collective: every rank calls it. Returns
    the final folder. (CheckpointSaver(async_save=True) writes the same folder while training goes on.)"""
    name = checkpoint_name(step)
    path = os.path.join(root, name)
    _prepare_root(root, path)
    _write(path, _training_sharded(chunks, optimizer, ema, trainer_state), config, trainer_state,
           content_metadata=OPTIMIZER_METADATA)
    _move_latest(root, name, keep)
    return path


class CheckpointSaver:
    """What the trainer saves through: save_checkpoint's folder, written in the step loop (async_save=False)
    or in the background while the next steps train (async_save=True).

        saver = CheckpointSaver(async_save=True)
        saver.save(root, step, chunks, optimizer, state, config, ema=ema, keep=3)   # collective; returns at once
        ...  each step: saver.finalize()             # collective; commits a write every rank has finished
        saver.close()                                # collective; waits for the write and commits it

    A background save (megatron-core's dist_checkpointing.save(async_sharded_save=True) scheduled on its
    AsyncCallsQueue): the plan and a snapshot of this rank's tensors are taken synchronously (a real copy,
    snapshot_write_buckets), then a forked process writes the files while training continues. When every
    rank's writer has finished, megatron runs the finalize steps on all ranks together: its metadata, then
    megawan's _commit (config, trainer state, manifests, rename) and _move_latest. Until then `latest` names
    the previous checkpoint, so a job killed at any moment resumes from a complete one; the unfinished
    `.tmp` is removed by the next save. A new save first waits for the previous one to be committed.
    """

    def __init__(self, async_save: bool = False):
        self.async_save = async_save
        self._queue = None
        self._pending = []  # folders scheduled and not committed yet (the same on every rank)
        self._committed = []  # committed and not reported by finalize() yet (save() commits the previous one)

    @property
    def pending(self) -> list:
        return list(self._pending)

    def _calls(self):
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies import async_utils

            if not cuda_available():  # its all-reduces and staging sync name the CUDA device: the CPU here
                from megawan.parallel.cpu_compat import redirect_module_cuda

                redirect_module_cuda(async_utils)
            # forked writers (TemporalAsyncCaller), not the persistent spawned worker: megatron's persistent
            # worker calls torch.cuda.set_device at start (fails on a CPU-only torch) and pickles the request
            # through a spawn queue, which moves every tensor into shared memory first; a fork needs neither
            # and is what megatron's writer already does for each file (write_preloaded_data_multiproc)
            self._queue = async_utils.AsyncCallsQueue(persistent=False)
        return self._queue

    def save(self, root: str, step: int, chunks: list, optimizer, trainer_state: dict, config: dict,
             ema=None, keep: int = 3) -> str:
        """Collective. Writes `<root>/iter_<step>` (synchronously, or scheduled in the background); returns
        the folder it becomes once committed."""
        if not self.async_save:
            return save_checkpoint(root, step, chunks, optimizer, trainer_state, config, ema=ema, keep=keep)
        if self._pending:  # one write at a time: the previous one is committed first (reported by finalize())
            self._calls().maybe_finalize_async_calls(blocking=True)
        name = checkpoint_name(step)
        path = os.path.join(root, name)
        _prepare_root(root, path)
        tmp = _begin(path)
        texts = _texts(config, trainer_state)
        request = dist_checkpointing.save(_training_sharded(chunks, optimizer, ema, trainer_state), tmp,
                                          sharded_strategy=save_strategy(snapshot=True),
                                          content_metadata=OPTIMIZER_METADATA, async_sharded_save=True)
        # the forked writer dies with this rank: a SIGKILLed rank's writer must not go on writing into a `.tmp`
        # that the resumed run removes and may create again
        if request.async_fn is not None:  # None: nothing to write on this rank
            request = request._replace(async_fn=functools.partial(run_dying_with_parent, os.getpid(),
                                                                  request.async_fn))
        request.add_finalize_fn(lambda: _commit(tmp, path, *texts))
        request.add_finalize_fn(lambda: _move_latest(root, name, keep))
        request.add_finalize_fn(lambda: self._committed.append(self._pending.pop(0)))
        self._pending.append(path)
        self._calls().schedule_async_request(request)
        return path

    def finalize(self, blocking: bool = False) -> list:
        """Collective (every rank, at the same point of the step loop): commit the background writes every
        rank has finished (blocking=True: wait for them). Returns the folders committed since the last call
        (save() commits the previous write before scheduling its own). Without a write in flight there is
        no communication."""
        if self._pending:
            self._calls().maybe_finalize_async_calls(blocking=blocking)
        done, self._committed = self._committed, []
        return done


    def close(self) -> list:
        """Collective: wait for the write in flight and commit it (the end of training, a signal's stop)."""
        return self.finalize(blocking=True)

    def abort(self) -> None:
        """Local, after an error: stop the writer without committing (its `.tmp` stays; `latest` is
        unchanged; the next save removes the folder)."""
        if self._queue is not None:
            for call in self._queue.async_calls:
                call.async_caller.close(abort=True)
            self._queue.async_calls.clear()
        self._pending.clear()


def save_model_checkpoint(path: str, chunks: list, config: dict, trainer_state: dict) -> str:
    """A weights-only checkpoint folder at `path` (e.g. a converted DiT): loadable by load_weights /
    load_checkpoint at any layout and as a warm start. Collective over the world that holds `chunks`."""
    path = os.path.abspath(path)
    if os.path.exists(path):  # every rank sees it (a shared file system) and stops before the collective
        raise FileExistsError(f"checkpoint {path} exists already")
    _write(path, {"model": model_sharded_state_dict(chunks)}, config, trainer_state)
    _barrier()
    return path


# ----------------------------------------------------------------------------------------------
# Loading


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


def _load(sharded: dict, path: str) -> dict:
    with warnings.catch_warnings():  # torch's deprecation notice inside megatron's loader, not ours to act on
        warnings.simplefilter("ignore", FutureWarning)
        return dist_checkpointing.load(sharded, path)


def _fill_chunks(chunks: list, loaded_model: dict, adapters_only: bool = False) -> None:
    for i, chunk in enumerate(chunks):
        # a DiT pipeline chunk holds some blocks under local numbers; other modules (the VAE) hold everything
        part = loaded_model[f"chunk{i}"]
        if hasattr(chunk, "layers"):
            part = chunk_state_dict(part, chunk)
        if adapters_only:  # a LoRA checkpoint: every adapter of the chunk, nothing else
            missing = [k for k in chunk.state_dict() if is_lora_parameter(k) and k not in part]
            if missing:
                raise CheckpointError(f"the LoRA checkpoint has no {missing[0]} (another lora.targets?)")
        chunk.load_state_dict(part, strict=not adapters_only)


def load_checkpoint(path: str, chunks: list, optimizer=None, ema=None) -> dict:
    """Load weights (and, when given, optimizer and EMA) from `path` into this rank's chunks under the current
    layout. Returns the trainer state. A warm start passes no optimizer and then calls the optimizer's
    reload_model_params() so that its fp32 main weights are the loaded ones. A LoRA checkpoint fills the adapters
    only (apply_lora first, the base loaded beforehand)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    trainer_state = read_trainer_state(path)
    adapters_only = LORA_BASE in trainer_state
    model_sd = model_sharded_state_dict(chunks, adapters_only)
    sharded = {"model": model_sd}
    if optimizer is not None:
        _prepare_optimizer_for_load(optimizer)
        sharded[_OPTIMIZER_PREFIX] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                  metadata=OPTIMIZER_METADATA)
    if ema is not None:
        sharded["ema"] = ema.sharded_state_dict([model_sd[f"chunk{i}"] for i in range(len(chunks))],
                                                is_loading=True)
    loaded = _load(sharded, path)
    _fill_chunks(chunks, loaded["model"], adapters_only)
    if optimizer is not None:
        optimizer.load_state_dict(loaded[_OPTIMIZER_PREFIX])
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            # megatron hands every parameter one shared `step` tensor; torch's Adam increments each
            # parameter's step in place, so a shared one would advance once per parameter per step
            for state in getattr(getattr(opt, "optimizer", None), "state", {}).values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
    if ema is not None:
        ema.load_loaded(loaded["ema"])
    return trainer_state


def load_weights(path: str, chunks: list, ema: bool = False) -> None:
    """The model weights of checkpoint `path` into this rank's chunks (any layout it was saved at); with
    ema=True the EMA's (fp32) weights take the parameters' place, cast to their dtype (buffers and extra
    states still come from the model)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    # every rank of the load checks a share of the checksums and all agree (the load below is collective too)
    _check_present(path, verify_checkpoint(path, collective=True))
    if is_lora_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} holds a LoRA run's adapters only: load its base "
                              f"({read_trainer_state(path)[LORA_BASE]['path']}), then the adapters")
    model_sd = model_sharded_state_dict(chunks)
    if ema:
        for i, chunk in enumerate(chunks):
            params = {id(p) for p in chunk.parameters()}
            part = model_sd[f"chunk{i}"]
            for key, entry in part.items():
                data = getattr(entry, "data", None)
                if id(data) in params:  # the EMA is saved as fp32 tensors shaped like the parameters
                    part[key] = dataclasses.replace(entry, key=EMA_PREFIX + entry.key, dtype=torch.float32,
                                                    data=torch.empty_like(data, dtype=torch.float32))
    loaded = _load({"model": model_sd}, path)
    with torch.no_grad():
        _fill_chunks(chunks, loaded["model"])


class CheckpointTensors:
    """The model tensors of a checkpoint folder, each loaded whole on its own (whatever TP / PP layout it was
    saved at), without a process group: what conversion streams from. ema=True reads the EMA weights."""

    def __init__(self, folder: str, ema: bool = False):
        verdict = verify_checkpoint(folder)
        if verdict not in (None, UNVERIFIED):
            raise CheckpointError(f"checkpoint {folder} is damaged: {verdict}")
        self.folder, self.prefix = folder, EMA_PREFIX if ema else ""
        self._meta = {k[len(self.prefix):]: m for k, m in _tensor_metadata(folder).items()
                      if k.startswith(self.prefix) and hasattr(m, "size") and not k.startswith(_OPTIMIZER_PREFIX)
                      and (ema or not k.startswith(EMA_PREFIX))}
        if not self._meta:
            raise ValueError(f"{folder} holds no {'EMA ' if ema else ''}model tensors")

    def keys(self) -> list:
        return list(self._meta)

    def get(self, key: str) -> torch.Tensor:
        m = self._meta[key]
        out = {self.prefix + key: torch.empty(tuple(m.size), dtype=m.properties.dtype)}
        with warnings.catch_warnings():  # torch's notice about no_dist, not ours to act on
            warnings.simplefilter("ignore")
            dcp.load(out, checkpoint_id=self.folder, no_dist=True)
        return out[self.prefix + key]

    def get_many(self, keys) -> dict:
        """{key: tensor} for `keys`, read in one pass (a small model's whole state: one read, not one per key)."""
        out = {self.prefix + k: torch.empty(tuple(self._meta[k].size), dtype=self._meta[k].properties.dtype)
               for k in keys}
        with warnings.catch_warnings():  # torch's notice about no_dist, not ours to act on
            warnings.simplefilter("ignore")
            dcp.load(out, checkpoint_id=self.folder, no_dist=True)
        return {k: out[self.prefix + k] for k in keys}
