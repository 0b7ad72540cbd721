"""Asynchronous checkpointing (checkpoint.async_save, megawan.checkpoint.CheckpointSaver): the files are written in
the background while the next steps train, and `latest` moves only once every rank has finished and recorded its
manifest.

- the snapshot a background write reads is a real copy: a checkpoint written in the background while the
  optimizer goes on changing the weights and Adam moments in place holds, bit for bit, the tensors a synchronous
  checkpoint of the same step holds; megatron's own CPU staging (`tensor.to("cpu")`, the tensor itself) would
  write the later values, which is shown too;
- `megawan train` with checkpoint.async_save gives the synchronous run's losses step for step, and so does its
  resumed continuation;
- a SIGKILL while an asynchronous checkpoint is not committed yet leaves `latest` at the previous one, and the
  resume from it gives the uninterrupted losses (no step lost or repeated); the next save removes the `.tmp`.
"""

import json
import os
import re
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_ema import _train_step
from test_trainer import _kill_when, _launch, _losses, _run
from torch.distributed.checkpoint import FileSystemReader

from megawan.config import ParallelConfig, dit_preset
from megawan.parallel.launch import spawn_local
from megawan.training.metrics import read_metrics

pytestmark = pytest.mark.reliability  # the reliability suite: docs/reliability.md


@pytest.fixture(scope="session")
def store(tiny_store):  # the session's tiny store (tests/conftest.py), which the `uninterrupted` run trained on
    return tiny_store


def _all_tensors(folder: str) -> dict:
    """Every tensor of a checkpoint folder (model, optimizer, EMA), whole, read without a process group."""
    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items() if hasattr(m, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(out, checkpoint_id=folder, no_dist=True)
    return out


def _write_in_place(request, snapshot_first_then):
    """What megatron's persistent worker does with a request, in this process: stage the tensors (the request's
    preload), let `snapshot_first_then` run (training going on), then write the staged tensors and finalize."""
    staged = request.preload_fn() if request.preload_fn else None  # None: nothing of this rank's is written
    snapshot_first_then()
    if request.async_fn is not None:
        args = list(request.async_fn_args)
        args[1] = staged
        request.async_fn(*args)
    torch.distributed.barrier()
    for fn in request.finalize_fns:
        fn()


def _snapshot_worker(rank, root):
    from megatron.core import dist_checkpointing

    from megawan import checkpoint as ckpt
    from megawan.checkpoint_strategy import SaveStrategy
    from megawan.models.dit.parallelize import build_model_chunks
    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.training import optimizer as optim

    cfg = dit_preset("tiny")
    with megatron_cpu_mode():
        def build(distributed):
            torch.manual_seed(0)
            chunks = build_model_chunks(cfg, ParallelConfig())
            ddp = optim.wrap_data_parallel(chunks, distributed_optimizer=distributed)
            optimizer = optim.build_optimizer(ddp, lr=1e-2, distributed_optimizer=distributed)

            def train(step):  # the global batch: sample 0 on DP rank 0, sample 1 on DP rank 1
                assert _train_step(ddp, optimizer, cfg, step, [rank])

            def save_sync(name, step):
                ckpt.save_checkpoint(os.path.join(root, name), step, chunks, optimizer, {"step": step}, {})
            return chunks, optimizer, train, save_sync

        # 1. the trainer's path (distributed optimizer, DP2): CheckpointSaver forks a writer per rank; step 2
        #    trains while the step-1 files are written; `latest` moves when the saver commits
        chunks, optimizer, train, save_sync = build(distributed=True)
        train(1)
        save_sync("sync", 1)
        saver = ckpt.CheckpointSaver(async_save=True)
        path = saver.save(os.path.join(root, "async"), 1, chunks, optimizer, {"step": 1}, {})
        assert saver.pending == [path] and not os.path.exists(os.path.join(root, "async", "latest"))
        train(2)
        assert saver.close() == [path] and not saver.pending
        assert ckpt.latest_checkpoint(os.path.join(root, "async")) == path

        # 2. megatron's non-distributed optimizer, whose state dict hands the writer its live fp32 weights and
        #    Adam moments, each request written by a process that does not fork (as megatron's persistent worker):
        #    megawan's staging copies, so the next step changing them in place does not reach the files ...
        chunks, optimizer, train, save_sync = build(distributed=False)
        train(1)
        for name, snapshot, step in (("snapshot", True, 1), ("no_copy", False, 2)):
            save_sync("plain", step)
            folder = os.path.join(root, name)
            if rank == 0:
                os.makedirs(folder)
            torch.distributed.barrier()
            request = dist_checkpointing.save(ckpt._training_sharded(chunks, optimizer, None), folder,
                                              sharded_strategy=SaveStrategy(snapshot=snapshot),
                                              content_metadata=ckpt.OPTIMIZER_METADATA, async_sharded_save=True)
            _write_in_place(request, lambda: train(step + 1))
            # ... 3. while megatron's staging (`.to("cpu")` of a CPU tensor: the tensor itself) writes step 3's


def test_a_background_write_holds_the_tensors_of_its_step(tmp_path):
    root = str(tmp_path)
    spawn_local(_snapshot_worker, world_size=2, args=(root,))
    assert json.load(open(os.path.join(root, "async", "iter_0000001", "trainer_state.json"))) == {"step": 1}
    for written, reference, same in (("async/iter_0000001", "sync/iter_0000001", True),
                                     ("snapshot", "plain/iter_0000001", True), ("no_copy", "plain/iter_0000002", False)):
        got, ref = _all_tensors(os.path.join(root, written)), _all_tensors(os.path.join(root, reference))
        assert sorted(got) == sorted(ref) and any(k.startswith("optimizer") for k in ref)
        differ = [k for k in ref if not torch.equal(got[k], ref[k])]
        if same:
            assert differ == [], f"{written}: {differ[:3]} differ from the synchronous checkpoint of its step"
        else:  # the hazard the snapshot removes: Adam's moments, changed in place by the next step, were written
            assert any("exp_avg" in k for k in differ), differ


ASYNC = "checkpoint.async_save=true"


def _said(log: str) -> str:
    """The trainer's own lines of a log (for an assertion's message)."""
    return "\n".join(line for line in log.splitlines() if line.startswith("[megawan]"))


def test_async_saves_train_like_sync_ones(store, uninterrupted, tmp_path):
    """Checkpoints at steps 2, 4, 6, 8 written in the background: the synchronous run's losses bit for bit, each
    checkpoint committed at a later step than it was taken (training went on meanwhile), the last one waited for
    at the end. (Its resumed continuation: the kill test below.)"""
    _, ref = uninterrupted
    ckpt = str(tmp_path / "ckpt")
    code, log = _run(2, ckpt, store, ASYNC)
    assert code == 0, log
    for step in (2, 4, 6):
        assert f"iter_000000{step}: writing in the background" in log, _said(log)
        committed = re.search(rf"iter_000000{step} \(committed at step (\d+)", log)
        assert committed and int(committed.group(1)) > step, _said(log)
    assert "iter_0000008 (committed at step 8" in log, _said(log)
    assert _losses(ckpt) == ref
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000008"
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("iter_")) == ["iter_0000006", "iter_0000008"]  # keep 2


def test_kill_while_an_async_checkpoint_is_uncommitted_resumes_from_the_previous_one(store, uninterrupted, tmp_path):
    """SIGKILL (every rank and its writer) once step 5 has trained while the step-4 checkpoint is still a
    `.tmp`: `latest` names step 2, and the resume from it gives the uninterrupted losses, no step lost or
    repeated; its own step-4 save removes the unfinished folder."""
    _, ref = uninterrupted
    for attempt in range(4):
        ckpt = str(tmp_path / f"ckpt{attempt}")
        metrics = os.path.join(ckpt, "logs", "metrics.jsonl")
        proc = _launch(2, ckpt, store, ASYNC)

        def in_flight():  # step 5 trained, checkpoint 4 not committed
            return (os.path.isdir(os.path.join(ckpt, "iter_0000004.tmp")) and os.path.exists(metrics)
                    and len(read_metrics(metrics)) >= 5)

        assert _kill_when(proc, in_flight), proc.communicate()[0]
        if os.path.isdir(os.path.join(ckpt, "iter_0000004.tmp")):
            break
    else:
        pytest.fail("never killed a job while a background write was uncommitted")
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000002"
    assert not os.path.exists(os.path.join(ckpt, "iter_0000004"))
    code, log = _run(2, ckpt, store, ASYNC)
    assert code == 0, log
    assert "resumed from" in log and "at step 2" in log
    assert _losses(ckpt) == ref
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpt))
