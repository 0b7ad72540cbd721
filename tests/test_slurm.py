"""examples/slurm/*.sbatch on a real one-node Slurm cluster on localhost (tests/slurm_cluster.py): a 2-task
`megawan train` job (TP2) runs to its last step and checkpoint; a longer one is warned twice (SIGUSR1 to the
batch shell, as `#SBATCH --signal=B:USR1@300` does, then straight to the tasks), checkpoints, requeues itself
and resumes from `latest` each time until train.steps; a cancelled one is not requeued; a precompute job
warned at once requeues itself and its rerun fills the store.

Skipped (with the reason) only where Slurm cannot be installed or started: no apt-get, not root, daemons
that do not come up; with MEGAWAN_REQUIRE_SLURM=1 (tools/run_tests.sh sets it where Slurm is installed and it
runs as root) that is a failure instead. docs/slurm.md explains the scripts and this set-up.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from slurm_cluster import SlurmCluster, SlurmUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join("examples", "slurm", "train.sbatch")
PRECOMPUTE = os.path.join("examples", "slurm", "precompute.sbatch")
CONFIG = os.path.join("examples", "configs", "tiny_train.yaml")
# The scripts ask for GPUs and many CPUs per task; this node has neither.
ONE_NODE = ["-N1", "-n2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY"}  # a job in COMPLETING still has processes; a requeued one is PENDING again


# ----------------------------------------------------------------------------------------------
# Without a cluster


@pytest.mark.parametrize("script", [TRAIN, PRECOMPUTE])
def test_scripts_parse_and_ask_for_what_the_docs_say(script):
    path = os.path.join(ROOT, script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path, encoding="utf-8").read()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    for option in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--requeue",
                   "--open-mode", "--output"):
        assert any(d.startswith(option) for d in directives), (script, option)
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives
    # sbatch reads #SBATCH lines only before the first command
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if i and line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))


@pytest.mark.parametrize("local_rank,visible,device", [(5, 8, 5), (5, 1, 0), (6, 4, 2), (3, 0, 3)])
def test_local_rank_picks_among_the_gpus_the_task_sees(monkeypatch, local_rank, visible, device):
    """Plain srun: every task sees the node's GPUs; --gpus-per-task=1 / --gpu-bind: only its own."""
    import torch

    from megawan.parallel.initialize import local_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert local_device(local_rank) == device


# ----------------------------------------------------------------------------------------------
# On a cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
    except SlurmUnavailable as e:
        if os.environ.get("MEGAWAN_REQUIRE_SLURM", "0") not in ("", "0"):  # tools/run_tests.sh, Slurm installed
            pytest.fail(f"MEGAWAN_REQUIRE_SLURM is set, but the Slurm cluster did not start: {e}")
        pytest.skip(f"no Slurm cluster on this machine: {e}")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def dataset(slurm_dataset):  # tests/conftest.py: one tiny store for both Slurm test modules
    return slurm_dataset


def _env(cluster):
    return dict(cluster.env, MEGAWAN_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _submit(cluster, script, log, *args):
    """sbatch the script from the repository root; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", *ONE_NODE, f"--output={log}", script, *args], cwd=ROOT,
                         env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    job_id = out.stdout.strip().split(";")[0]
    assert out.returncode == 0 and job_id.isdigit(), out.stdout
    return job_id


def _finish(cluster, job_id, log, timeout=300):
    """Wait until the job has ended for good (not requeued, tasks gone); returns scontrol's fields. Polled
    here rather than with `sbatch --wait`, which backs off to 32 s between polls."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = cluster.job(job_id)
        if job.get("JobState") in ENDED:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still not done after {timeout} s: {cluster.job(job_id)}\n{_read(log)}\n"
                         f"{cluster.logs()}")


def _read(path):
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else "(no log)"


def _latest_step(ckpt):
    name = open(os.path.join(ckpt, "latest"), encoding="utf-8").read().strip()
    with open(os.path.join(ckpt, name, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)["step"]


def _metrics(ckpt):
    path = os.path.join(ckpt, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path, encoding="utf-8").read().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return rows


def _wait(what, ready, timeout, cluster, job_id, log):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {cluster.job(job_id)}\n{_read(log)}\n{cluster.logs()}")


def _train_args(dataset, ckpt, *overrides):
    store, _ = dataset
    return [CONFIG, f"data.store={store}", f"checkpoint.dir={ckpt}", "logging.tensorboard=false",
            "logging.progress=true", *overrides]


def test_train_job_runs_to_its_last_step(cluster, dataset, tmp_path):
    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "train-%j.out")
    job_id = _submit(cluster, TRAIN, log, *_train_args(dataset, ckpt, "train.steps=4"))
    log = log.replace("%j", job_id)
    job = _finish(cluster, job_id, log)
    text = _read(log)
    assert job["ExitCode"] == "0:0", f"{job}\n{text}\n{cluster.logs()}"
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", job
    assert _latest_step(ckpt) == 4
    assert open(os.path.join(ckpt, "latest")).read().strip() in os.listdir(ckpt)
    assert [row["step"] for row in _metrics(ckpt)] == [1, 2, 3, 4]
    assert re.search(r"train 4/4 steps .*loss \d+\.\d+", text), text  # rank 0's progress lines
    assert "[slurm] finished: train.steps reached" in text, text
    assert "2 tasks on 1 node(s)" in text


@pytest.mark.reliability
def test_preempted_train_job_checkpoints_requeues_and_resumes(cluster, dataset, tmp_path):
    """Warned twice: the batch shell (scancel --batch, what --signal=B:USR1@300 does at the time limit) and
    then the tasks directly (scancel without --batch). Each time the ranks checkpoint together and exit 0, the
    script requeues the job (same id), and the next run resumes from `latest`; the third run finishes."""
    steps = 20
    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "train-%j.out")
    job_id = _submit(cluster, TRAIN, log, *_train_args(dataset, ckpt, f"train.steps={steps}",
                                                               "checkpoint.every=1000"))
    log = log.replace("%j", job_id)
    stops = []
    for restart, batch_only in ((0, True), (1, False)):
        done = len(_metrics(ckpt))  # rows so far = the step the previous run stopped at
        _wait(f"run {restart} to train 2 steps", lambda: len(_metrics(ckpt)) >= done + 2
              and cluster.job(job_id).get("Restarts") == str(restart), 240, cluster, job_id, log)
        cluster.run("scancel", "--signal=USR1", *(["--batch"] if batch_only else []), job_id)
        _wait(f"requeue {restart + 1}", lambda: cluster.job(job_id).get("Restarts") == str(restart + 1),
              120, cluster, job_id, log)
        stops.append(_latest_step(ckpt))
        assert done + 2 <= stops[-1] < steps, (stops, _read(log))
    job = _finish(cluster, job_id, log)
    text = _read(log)
    assert job["ExitCode"] == "0:0", f"{job}\n{text}\n{cluster.logs()}"
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", job
    assert _latest_step(ckpt) == steps
    assert text.count("(signal SIGUSR1)") == 2, text
    assert text.count("SIGUSR1 (pre-emption / time-limit warning)") == 1, text  # only the first went to the shell
    for stop in stops:
        assert f"stopped at step {stop} of {steps}: requeueing job {job_id}" in text, text
        assert re.search(rf"resumed from \S+ at step {stop}\b", text), text
    assert "[slurm] finished: train.steps reached" in text
    logged = [row["step"] for row in _metrics(ckpt)]
    assert sorted(set(logged)) == list(range(1, steps + 1)) and len(logged) == steps, logged


def _precompute_args(dataset, out):
    """precompute.sbatch's arguments: the manifest, encoders and buckets the tiny store was made with."""
    from megawan.demo.tiny_dataset import IMAGE_BUCKET, VIDEO_BUCKET

    store, enc = dataset
    return ["--manifest", os.path.join(os.path.dirname(store), "manifest.jsonl"), "--out", out,
            "--vae", enc["vae"], "--vae-config", enc["vae_config"], "--text-encoder", enc["text_encoder"],
            "--text-config", enc["text_config"], "--tokenizer", enc["tokenizer"],
            "--stage-buckets", VIDEO_BUCKET, IMAGE_BUCKET, "--decode-workers", "1", "--no-progress"]


@pytest.mark.reliability
def test_precompute_job_requeued_by_its_warning_finishes_the_store(cluster, dataset, tmp_path):
    """SIGUSR1 to the batch shell as soon as it runs: the job requeues itself, and the rerun (same id) writes
    what is missing; every clip of the manifest ends up in the store exactly once."""
    from megawan.data.store import LatentStore

    store = dataset[0]
    out, log = str(tmp_path / "latents.zarr"), str(tmp_path / "precompute-%j.out")
    args = _precompute_args(dataset, out)
    job_id = _submit(cluster, PRECOMPUTE, log, *args)
    log = log.replace("%j", job_id)
    _wait("the batch shell to start", lambda: "(restart 0)" in _read(log), 120, cluster, job_id, log)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    job = _finish(cluster, job_id, log)
    text = _read(log)
    assert job["ExitCode"] == "0:0", f"{job}\n{text}\n{cluster.logs()}"
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    assert f"requeueing job {job_id}" in text and "(restart 1)" in text, text
    written, expected = LatentStore.open(out).ids(), LatentStore.open(store).ids()
    assert len(written) == len(set(written)) and sorted(written) == sorted(expected) and len(expected) == 16


@pytest.mark.reliability
def test_cancelled_train_job_is_not_requeued(cluster, dataset, tmp_path):
    """scancel sends SIGTERM to the batch shell and the tasks: the trainer checkpoints and leaves, and the script
    ends without requeueing (a cancel must stay a cancel)."""
    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "train-%j.out")
    args = _train_args(dataset, ckpt, "train.steps=1000", "checkpoint.every=1000")
    job_id = _submit(cluster, TRAIN, log, *args)
    log = log.replace("%j", job_id)
    _wait("2 steps", lambda: len(_metrics(ckpt)) >= 2, 240, cluster, job_id, log)
    cluster.run("scancel", job_id)
    job = _finish(cluster, job_id, log)
    text = _read(log)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", job
    assert "SIGTERM: the job is being ended by Slurm" in text and "requeueing" not in text, text
