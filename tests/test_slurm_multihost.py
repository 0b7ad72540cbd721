"""examples/slurm/*.sbatch on a real two-host Slurm cluster (tests/slurm_cluster.py's MultiHostSlurmCluster):
two network namespaces on a bridge, mwh1 and mwh2, each with its own IP, hostname, /etc/hosts, munged and
slurmd; slurmctld on the bridge in the root namespace. The file system is shared, as on a real cluster.

- `sbatch --nodes 2` of train.sbatch trains TP2 x DP2 (2 tasks per host), the rendezvous taken from Slurm
  (MASTER_ADDR = mwh1, the first host of SLURM_JOB_NODELIST; gloo binds the address the host's name resolves
  to), and its loss curve is bit-identical to the same 4 ranks on one host;
- a host lost mid-run (kill -9 of every process on it: munged, slurmd, slurmstepd, the tasks): Slurm marks it
  DOWN, requeues the job (NODE_FAIL), the host comes back, and the rerun resumes from the newest checkpoint:
  the curve is again bit-identical, the steps since that checkpoint computed once more with the same values;
- precompute.sbatch over both hosts writes every clip once, bit-identical to a one-process precompute.

Skipped (with the reason) where Slurm or network namespaces are not available; tools/run_tests.sh sets
MEGAWAN_REQUIRE_SLURM=1 where Slurm is installed and it runs as root, and MEGAWAN_REQUIRE_NETNS=1 where
`ip netns add` works, and then it is a failure instead.
docs/slurm.md ("The two-host test cluster") describes the set-up.
"""

import os
import re
import subprocess
import time

import pytest
import torch

from slurm_cluster import SLURMD_TIMEOUT, MultiHostSlurmCluster, NetnsUnavailable, SlurmUnavailable
from test_slurm import PRECOMPUTE, ROOT, TRAIN, _env, _finish, _latest_step, _metrics, _precompute_args, \
    _read, _train_args, _wait

pytestmark = pytest.mark.reliability  # the reliability suite: docs/reliability.md

TWO_HOSTS = ["-N2", "-n4", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
ONE_HOST = ["-N1", "-n4", "--ntasks-per-node=4", "--cpus-per-task=1", "--gpus-per-node=0", "--nodelist=mwh1"]
STEPS = 6
CURVE = ("loss", "grad_norm", "lr")  # what must match bit for bit (json keeps a float's every bit)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    c = MultiHostSlurmCluster(str(tmp_path_factory.mktemp("slurm-hosts")), nodes=("mwh1", "mwh2"))
    try:
        c.start()
    except SlurmUnavailable as e:
        # Slurm missing or network namespaces impossible here: skip, unless tools/run_tests.sh found them
        # working (MEGAWAN_REQUIRE_SLURM: Slurm installed and root; MEGAWAN_REQUIRE_NETNS: `ip netns add` works)
        need = "MEGAWAN_REQUIRE_NETNS" if isinstance(e, NetnsUnavailable) else "MEGAWAN_REQUIRE_SLURM"
        if os.environ.get(need, "0") not in ("", "0"):
            pytest.fail(f"{need} is set, but the two-host Slurm cluster did not start: {e}")
        pytest.skip(f"no two-host Slurm cluster on this machine: {e}")
    try:
        yield c
    finally:
        c.stop()  # also deletes the namespaces and the bridge, whatever the tests did


@pytest.fixture(scope="module")
def dataset(slurm_dataset):  # tests/conftest.py: one tiny store for both Slurm test modules
    return slurm_dataset


def test_each_host_is_a_machine_of_its_own(hosts):
    """What a job step sees on each host: its node name as hostname, resolving to its own address, a network
    namespace of its own, and its own munged (a credential made there names that host as its origin)."""
    probe = ('echo "$(hostname) $(getent hosts "$(hostname)" | cut -d" " -f1) $(readlink /proc/self/ns/net)'
             ' $(munge -n --socket "$1" | unmunge --socket "$1" | sed -n "s/^ENCODE_HOST: *//p")"')
    out = hosts.run("srun", "-N2", "--ntasks-per-node=1", "--label", "bash", "-c", probe, "probe",
                    hosts.munge_socket, timeout=60)
    seen = {}
    for line in out.splitlines():  # "0: mwh1 10.19.X.11 net:[4026532...] mwh1 (10.19.X.11)"
        task, name, addr, netns, *encoded = line.split()
        seen[name] = (addr, netns, " ".join(encoded))
    assert sorted(seen) == ["mwh1", "mwh2"], out
    for name, (addr, netns, encoded) in seen.items():
        assert addr == hosts.addr[name] and encoded == f"{name} ({addr})", out
    assert seen["mwh1"][1] != seen["mwh2"][1], out


def _submit(cluster, where, script, log, *args):
    out = subprocess.run(["sbatch", "--parsable", *where, f"--output={log}", script, *args], cwd=ROOT,
                         env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    job_id = out.stdout.strip().split(";")[0]
    assert out.returncode == 0 and job_id.isdigit(), out.stdout
    return job_id, log.replace("%j", job_id)


def _curve(rows):
    """{step: (loss, grad_norm, lr)} of each logged step."""
    return {row["step"]: tuple(row[k] for k in CURVE) for row in rows}


def _train(cluster, where, dataset, tmp_path, name, *overrides, every=1000):
    """train.sbatch of the tiny config for STEPS steps; checkpoint.every=1000: only the final checkpoint (each
    write costs seconds on 2 cores), unless the test needs periodic ones."""
    ckpt, log = str(tmp_path / f"{name}-ckpt"), str(tmp_path / f"{name}-%j.out")
    job_id, log = _submit(cluster, where, TRAIN, log, *_train_args(dataset, ckpt, f"train.steps={STEPS}",
                                                                   f"checkpoint.every={every}", *overrides))
    return job_id, log, ckpt


@pytest.fixture(scope="module")
def one_host_curve(hosts, dataset, tmp_path_factory):
    """The reference: the same job, 4 ranks on mwh1 alone."""
    job_id, log, ckpt = _train(hosts, ONE_HOST, dataset, tmp_path_factory.mktemp("one-host"), "train")
    job = _finish(hosts, job_id, log)
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "mwh1", f"{job}\n{_read(log)}\n{hosts.logs()}"
    rows = _metrics(ckpt)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), rows
    return _curve(rows)


def test_two_host_train_job_matches_one_host(hosts, dataset, one_host_curve, tmp_path):
    job_id, log, ckpt = _train(hosts, TWO_HOSTS, dataset, tmp_path, "train")
    job = _finish(hosts, job_id, log)
    text = _read(log)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{text}\n{hosts.logs()}"
    assert job["NodeList"] == "mwh[1-2]" and job["NumNodes"] == "2" and job["Restarts"] == "0", job
    assert "4 tasks on 2 node(s) mwh[1-2]" in text and "[slurm] finished: train.steps reached" in text, text
    assert _latest_step(ckpt) == STEPS
    rows = _metrics(ckpt)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), rows
    assert _curve(rows) == one_host_curve


def test_lost_host_requeues_the_job_and_it_resumes_bit_identically(hosts, dataset, one_host_curve, tmp_path):
    """kill -9 of everything on mwh2 once a checkpoint exists and a step past it is logged. The tasks on mwh1
    fail in their next collective, srun waits for the lost node until slurmctld declares it DOWN (SlurmdTimeout),
    and Slurm requeues the job itself (NODE_FAIL, --requeue); the batch shell gets SIGTERM and does not requeue
    it a second time. The rerun waits for two nodes, starts once mwh2 is back, resumes from `latest`."""
    # async checkpoints: the host may be lost while a background write is in flight, and `latest` must still
    # name a complete checkpoint (the reference wrote its checkpoint synchronously: the curve is the same)
    job_id, log, ckpt = _train(hosts, TWO_HOSTS, dataset, tmp_path, "train", "checkpoint.async_save=true", every=2)
    os.makedirs(ckpt, exist_ok=True)
    checkpointed = lambda: os.path.exists(os.path.join(ckpt, "latest")) and _latest_step(ckpt) >= 2  # noqa: E731
    _wait("a checkpoint and a step past it", lambda: checkpointed() and len(_metrics(ckpt)) > _latest_step(ckpt),
          300, hosts, job_id, log)
    hosts.kill_host("mwh2")
    try:
        killed = time.time()
        _wait("Slurm to requeue the job", lambda: hosts.job(job_id).get("Restarts") == "1", 60, hosts, job_id,
              log)
        noticed = time.time() - killed
        assert hosts._node_state("mwh2").startswith("down"), hosts._node_state("mwh2")
        assert noticed < SLURMD_TIMEOUT + 30, noticed
        # COMPLETING while mwh1 ends the first run's batch step, then PENDING: no second node, so it waits
        _wait("the requeued job to wait for nodes", lambda: hosts.job(job_id).get("JobState") == "PENDING", 60,
              hosts, job_id, log)
        before = _curve(_metrics(ckpt))  # what the first run logged (its tasks are gone by now)
        lost = len(before)
        newest = _latest_step(ckpt)  # the newest checkpoint it left: the rerun must resume from this one
    except BaseException:
        hosts.run("scancel", job_id, check=False)  # the next test gets both hosts, free
        raise
    finally:
        hosts.start_host("mwh2")
    job = _finish(hosts, job_id, log)
    text = _read(log)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{text}\n{hosts.logs()}"
    assert job["Restarts"] == "1", job
    assert "DUE TO NODE FAILURE" in text and "(restart 1)" in text, text
    assert "requeueing job" not in text, text  # Slurm requeued it, not the script
    resumed = re.search(r"resumed from \S+ at step (\d+)\b", text)
    assert resumed, text
    resume_step = int(resumed.group(1))
    assert resume_step == newest and 2 <= resume_step < lost <= STEPS, (resume_step, newest, lost)
    rows = _metrics(ckpt)
    # Each step once: the rerun dropped the rows the lost run logged after the checkpoint, and computed
    # those steps again to the same values.
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), rows
    after = _curve(rows)
    assert all(before[s] == after[s] for s in range(1, lost + 1)), (before, after)
    assert after == one_host_curve
    assert _latest_step(ckpt) == STEPS


def test_two_host_precompute_fills_the_store_like_one_process(hosts, dataset, tmp_path):
    """4 ranks over 2 hosts: each clip written once, and every array equal to the one-process precompute that
    made the dataset (same encoders, manifest and buckets)."""
    from megawan.data.store import LatentStore

    store = dataset[0]
    out, log = str(tmp_path / "latents.zarr"), str(tmp_path / "precompute-%j.out")
    args = _precompute_args(dataset, out)
    job_id, log = _submit(hosts, TWO_HOSTS, PRECOMPUTE, log, *args)
    job = _finish(hosts, job_id, log)
    text = _read(log)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{text}\n{hosts.logs()}"
    assert job["NodeList"] == "mwh[1-2]" and "4 tasks on 2 node(s)" in text, (job, text)
    written, reference = LatentStore.open(out), LatentStore.open(store)
    ids = written.ids()
    assert len(ids) == len(set(ids)) == 16 and sorted(ids) == sorted(reference.ids())
    assert len({p.path for b in written.buckets() for p in written.parts(b)}) > 1  # more than one writer
    for sample_id in ids:
        got, want = written.read(*written.locate(sample_id)), reference.read(*reference.locate(sample_id))
        for key in ("latents", "text", "logvar"):
            assert (key in got) == (key in want), (sample_id, key)
            if key in want:
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (sample_id, key)
        assert (got["caption"], got["text_length"]) == (want["caption"], want["text_length"]), sample_id
