"""`megawan train` under torchrun on gloo: a SIGKILL at a random step (or during a checkpoint write) and a
resume give the uninterrupted run's losses step for step; a resume under another layout continues with the
same loss; NaN steps are skipped and counted, and too many in a row stop the run; configs that cannot work
are refused before training, naming the field."""

import os
import random
import re
import signal
import time

import numpy as np
import pytest
import torch
# the launcher and readers are shared with the other `megawan train` tests (tests/training_runs.py); the
# underscore names stay importable from here for tests written against this file
from training_runs import CONFIG, kill_when as _kill_when, launch as _launch, losses as _losses, rows, run as _run

from megawan.config import ConfigError, load_config
from megawan.training.metrics import read_metrics


@pytest.fixture(scope="session")
def store(tiny_store):
    return tiny_store


def test_kill_at_a_random_step_then_resume_gives_the_same_losses(store, uninterrupted, tmp_path):
    ref_ckpt, ref = uninterrupted
    assert len(ref) == 8 and all(np.isfinite(ref))
    ckpt = str(tmp_path / "ckpt")
    target = random.Random(os.getpid()).randint(3, 6)
    metrics = os.path.join(ckpt, "logs", "metrics.jsonl")
    proc = _launch(2, ckpt, store)
    killed = _kill_when(proc, lambda: os.path.exists(metrics) and len(read_metrics(metrics)) >= target)
    assert killed, proc.communicate()[0]
    with open(os.path.join(ckpt, "latest")) as f:
        resumed_from = int(f.read().strip().split("_")[1])
    assert resumed_from < 8
    code, log = _run(2, ckpt, store)
    assert code == 0, log
    assert "resumed from" in log and f"at step {resumed_from}" in log
    assert _losses(ckpt) == ref  # bit for bit: same batches, noise, timesteps, optimizer and LR state


def test_torchrun_elastic_restarts_the_group_after_a_worker_dies_and_loses_no_step(store, uninterrupted, tmp_path):
    """Clusters without Slurm: `torchrun --max-restarts 2 --rdzv-backend c10d ...` (docs/slurm.md). One worker
    is SIGKILLed in step 6 (the checkpoint of step 4 is the newest); the agent stops the other, starts the
    group again on the same rendezvous, which resumes from that checkpoint and computes step 5 again: the run
    ends with the uninterrupted run's losses, each step logged once."""
    import psutil

    _, ref = uninterrupted
    ckpt = str(tmp_path / "ckpt")
    proc = _launch(2, ckpt, store, restarts=2)
    workers = []

    def in_step_6():  # the row of step 5 is written: step 6 is being computed
        if len(rows(ckpt)) < 5:
            return False
        workers.extend(p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "megawan.cli" in " ".join(p.cmdline()))
        return True

    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not in_step_6():
        time.sleep(0.005)
    assert len(workers) == 2, proc.communicate()[0]
    helpers = workers[0].children(recursive=True)  # megatron's checkpoint-writer Manager and its tracker
    workers[0].send_signal(signal.SIGKILL)  # one worker, not the agent: a process lost, not a node
    # EOF of the log comes only once every process holding it is gone: an orphaned helper would hang this
    log = proc.communicate(timeout=600)[0]
    assert helpers and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in helpers)
    assert proc.returncode == 0, log
    assert "starting on 2 ranks (torchrun restart 0 of at most 2)" in log
    assert "starting on 2 ranks (torchrun restart 1 of at most 2)" in log  # one restart, visible in the log
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert resumed < 6
    assert _losses(ckpt) == ref  # steps 1..8 each once (step 5's first row dropped), bit for bit


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(store, uninterrupted, tmp_path):
    _, ref = uninterrupted
    for attempt in range(4):
        ckpt = str(tmp_path / f"ckpt{attempt}")
        proc = _launch(2, ckpt, store)

        def writing():  # the second checkpoint (step 4) is being written
            return os.path.isdir(ckpt) and "iter_0000004.tmp" in os.listdir(ckpt)

        assert _kill_when(proc, writing), proc.communicate()[0]
        if "iter_0000004.tmp" in os.listdir(ckpt):  # the kill landed inside the write
            break
    else:
        pytest.fail("never killed a job inside a checkpoint write")
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "iter_0000002"
    code, log = _run(2, ckpt, store)
    assert code == 0, log
    assert "at step 2" in log
    assert _losses(ckpt) == ref
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpt))
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("iter_")) == ["iter_0000006", "iter_0000008"]  # keep 2


def test_resume_under_another_layout_continues_with_the_same_loss(store, uninterrupted, tmp_path):
    _, ref = uninterrupted
    ckpt = str(tmp_path / "ckpt")
    # the first 4 steps at TP2 (the reference layout), then TP1 x CP2 (ring), then PP2
    code, log = _run(2, ckpt, store, "train.steps=4", "optimizer.decay_steps=8")
    assert code == 0, log
    code, log = _run(2, ckpt, store, "train.steps=6", "optimizer.decay_steps=8", "parallel.tensor_parallel=1",
                     "parallel.context_parallel=2", "parallel.context_parallel_mode=ring")
    assert code == 0, log
    code, log = _run(2, ckpt, store, "optimizer.decay_steps=8", "parallel.tensor_parallel=1",
                     "parallel.pipeline_parallel=2")
    assert code == 0, log
    got = _losses(ckpt)
    assert got[:4] == ref[:4]
    np.testing.assert_allclose(got[4:], ref[4:], rtol=1e-5)


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path):
    from megawan.data.store import LatentStore, Sample

    path = str(tmp_path / "nan.zarr")
    store = LatentStore.create(path, vae={"name": "t", "z_dim": 4, "stride": [4, 8, 8]},
                               text_encoder={"name": "t", "max_length": 24, "dim": 32})
    writer = store.writer(0)
    for i in range(8):
        latents = torch.full((4, 5, 4, 6), float("inf") if i % 2 else 0.5)
        writer.write(Sample(id=f"s{i}", bucket="17x32x48", latents=latents, text=torch.zeros(24, 32), text_length=3))
    common = ["parallel.tensor_parallel=1", "data.video_ratio=1.0", "data.global_batch_size=1",
              "data.micro_batch_size=1", "train.ema_decay=0.0", "checkpoint.every=100"]
    # one epoch of 8 single-sample steps: the 4 inf samples' steps are skipped, the others train on
    code, log = _run(1, str(tmp_path / "a"), path, *common, "train.steps=8", "train.max_bad_steps=8")
    assert code == 0, log
    rows = read_metrics(str(tmp_path / "a" / "logs" / "metrics.jsonl"))
    assert sum(r["loss"] is None for r in rows) == 4 and rows[-1]["skipped_steps"] == 4
    assert all(r["grad_norm"] is not None and np.isfinite(r["loss"]) for r in rows if r["loss"] is not None)
    # K in a row stop the run with a message that says what to do
    code, log = _run(1, str(tmp_path / "b"), path, *common, "train.steps=8", "train.max_bad_steps=1")
    assert code != 0
    assert "1 steps in a row had a non-finite loss" in log and "tools/inspect_store.py" in log


@pytest.mark.parametrize("overrides,field", [
    (["data.store=/nowhere.zarr"], "data.store"),
    (["parallel.tensor_parallel=4", "model.num_heads=2"], "heads"),
    (["model.text_dim=24"], "model.text_dim"),
    (["model.in_dim=16"], "model.in_dim"),
    (["model.out_dim=16"], "model.out_dim"),  # the store's z_dim is 4: the loss target could not match
    (["data.buckets=[81x480x832]"], "data.buckets"),
    (["train.memory_budget_gb=0.000001"], "train.memory_budget_gb"),
    (["data.video_ratio=1.5"], "data.video_ratio"),
    (["train.fp8=delayed", "train.fp8_amax_history=0"], "train.fp8_amax_history"),
    (["train.fp8_attention=true"], "train.fp8_attention"),
    (["parallel.offload_blocks=99"], "parallel.offload_blocks"),
    (["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=true"], "parallel.overlap_param_gather"),
])
def test_configs_that_cannot_work_are_refused_before_training(store, overrides, field):
    from megawan.training.trainer import preflight

    cfg_overrides = [f"data.store={store}", *overrides] if not overrides[0].startswith("data.store") else overrides
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg = load_config(CONFIG, tuple(cfg_overrides))
        preflight(cfg, world_size=2)


def test_overlapped_communication_trains_checkpoints_and_validates_alike(store, tmp_path):
    """DP2 with the gradient reduce-scatter and the weight all-gather overlapped (small buckets, as on CUDA by
    default) gives the synchronous run's losses, and its EMA (read right after each step, while the next
    forward has not gathered the weights yet) gives the same held-out loss."""
    runs = {}
    for name, overlap in (("sync", "false"), ("overlap", "true")):
        ckpt = str(tmp_path / name)
        extra = ["parallel.ddp_bucket_size=2000"] if overlap == "true" else []
        code, log = _run(2, ckpt, store, "parallel.tensor_parallel=1", "train.steps=4", "validation.every=2",
                         f"validation.store={store}", "validation.num_samples=0", "validation.loss_samples=2",
                         f"parallel.overlap_grad_reduce={overlap}", f"parallel.overlap_param_gather={overlap}",
                         *extra)
        assert code == 0, log
        rows = read_metrics(os.path.join(ckpt, "logs", "metrics.jsonl"))
        runs[name] = ([r["loss"] for r in rows if "loss" in r], [r["val/loss"] for r in rows if "val/loss" in r])
    (losses, val), (ref_losses, ref_val) = runs["overlap"], runs["sync"]
    assert len(losses) == 4 and len(val) == 2
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)


def test_sigusr1_checkpoints_and_leaves_then_resume_continues(store, uninterrupted, tmp_path):
    """Slurm's pre-emption warning (`#SBATCH --signal=USR1@120`) reaches the tasks: they finish the step,
    write a checkpoint together and exit cleanly; the requeued job continues with the same losses."""
    import psutil

    _, ref = uninterrupted
    ckpt = str(tmp_path / "ckpt")
    metrics = os.path.join(ckpt, "logs", "metrics.jsonl")
    proc = _launch(2, ckpt, store, "checkpoint.every=100")
    deadline = time.time() + 600
    while time.time() < deadline and not (os.path.exists(metrics) and len(read_metrics(metrics)) >= 2):
        time.sleep(0.005)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "megawan.cli" in " ".join(p.cmdline())]
    assert len(workers) == 2
    for p in workers:
        p.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert "(signal SIGUSR1)" in log
    stopped = int(open(os.path.join(ckpt, "latest")).read().strip().split("_")[1])
    assert 2 <= stopped < 8
    code, log = _run(2, ckpt, store, "checkpoint.every=100")
    assert code == 0, log
    assert _losses(ckpt) == ref


def test_fp8_is_applied_only_when_configured():
    """No FP8 -> a no-op context; FP8 asked for where Transformer Engine cannot run -> a clear error."""
    import contextlib

    from megawan.capabilities import transformer_engine_available
    from megawan.training.precision import fp8_context

    assert isinstance(fp8_context(None), contextlib.nullcontext)
    if not transformer_engine_available():
        with pytest.raises(RuntimeError, match="train.fp8='delayed' needs Transformer Engine"):
            fp8_context("delayed")
