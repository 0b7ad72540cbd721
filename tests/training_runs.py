"""`megawan train` runs for the tests: launched under torchrun on the tiny config, killed like a node failure,
and read back from metrics.jsonl. tests/test_trainer.py, tests/test_trainer_layouts.py and the checkpoint tests
share them (the tiny store they train on is the session fixture `tiny_store` of tests/conftest.py).

    code, log = run(2, ckpt, store, "train.steps=4")                  # torchrun --nproc-per-node 2
    proc = launch(2, ckpt, store, restarts=1)                           # elastic: c10d rendezvous, 1 restart
    kill_when(proc, lambda: len(rows(ckpt)) >= 3)                       # SIGKILL the whole tree
    losses(ckpt), grad_norms(ckpt)                                       # one value per step, in step order
"""

import os
import subprocess
import sys
import time

from parallel_harness import kill_tree

from megawan.parallel.launch import free_port
from megawan.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_train.yaml")


def make_tiny_store(directory: str) -> str:
    """The store the trainer tests train on: 24 videos and 16 images of the tiny dataset (a few buckets of
    each, so a run of 8 steps at global batch 4 / 8 sees both streams and an epoch boundary)."""
    from megawan.demo.tiny_dataset import make_tiny_dataset

    path, _ = make_tiny_dataset(directory, videos=24, images=16)
    return path


def launch(nproc, ckpt, store, *overrides, restarts=None):
    """Start `megawan train` on `nproc` local ranks; returns the torchrun Popen (stdout and stderr together).

    restarts=None: a plain torchrun on a fixed master port. restarts=N: torchrun's elastic agent with a c10d
    rendezvous (as on a cluster without Slurm), restarting the whole group up to N times when a worker dies.
    Ports are free ones, not a counter: other test runs on the machine may hold any fixed range."""
    if restarts is None:
        rendezvous = ["--master-port", str(free_port())]
    else:
        rendezvous = ["--nnodes", "1", "--max-restarts", str(restarts), "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"localhost:{free_port()}", "--monitor-interval", "0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *rendezvous,
           "-m", "megawan.cli", "train", "--config", CONFIG, f"data.store={store}", f"checkpoint.dir={ckpt}",
           "logging.tensorboard=false", *overrides]  # these runs read metrics.jsonl; TensorBoard's import costs
    # each ~1 s (tests/test_trackers.py, test_validation.py and test_demo.py read events back)
    # a session of its own: kill_tree and the tests' signals reach this run only
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(nproc, ckpt, store, *overrides, restarts=None):
    """`launch` and wait: (exit code, log)."""
    proc = launch(nproc, ckpt, store, *overrides, restarts=restarts)
    log = proc.communicate(timeout=900)[0]
    return proc.returncode, log


def rows(ckpt):
    """The training rows of metrics.jsonl (validation rows carry val/... only); [] before the first step."""
    path = os.path.join(ckpt, "logs", "metrics.jsonl")
    return [r for r in read_metrics(path) if "loss" in r] if os.path.exists(path) else []


def _per_step(ckpt, key):
    got = rows(ckpt)
    steps = [r["step"] for r in got]
    # a resumed run drops the rows of steps after its checkpoint before it logs them again: each step once
    assert steps == list(range(1, len(steps) + 1)), f"steps logged: {steps}"
    return [r[key] for r in got]


def losses(ckpt):
    """The loss of each step, steps 1, 2, ... each exactly once."""
    return _per_step(ckpt, "loss")


def grad_norms(ckpt):
    return _per_step(ckpt, "grad_norm")


def kill_when(proc, ready, timeout=600):
    """SIGKILL `proc` and everything under it (a node failure) as soon as ready() holds; False if the run ended
    or the time ran out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            kill_tree(proc.pid)
            proc.wait()
            return True
        time.sleep(0.005)
    return False
