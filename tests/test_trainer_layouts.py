"""`megawan train` under pipeline parallelism trains the model one rank trains: 4 steps from a warm-up at lr 0
(the first step changes nothing but the optimizer's moments, so a wrong gradient shows in the steps after it)
give one rank's loss and gradient norm at every step, in fp32.

The step-1 gradient norm is the sharp check: the head starts at zero, so the step-1 loss is the same for any
weights, while the gradient of the head depends on every block before it (a stage that initialised its blocks
or its copy of the shared embeddings differently from one rank shows here first)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from megawan.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_train.yaml")
_PORT = [29860]
# 4 blocks: 2 stages x 2 chunks each; no checkpoint or EMA: only the steps are compared
COMMON = ["model.num_layers=4", "train.steps=4", "optimizer.warmup_steps=2", "train.precision=fp32",
          "train.ema_decay=0", "checkpoint.every=100", "parallel.tensor_parallel=1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from megawan.demo.tiny_dataset import make_tiny_dataset

    path, _ = make_tiny_dataset(str(tmp_path_factory.mktemp("layouts")), videos=24, images=16)
    return path


def _train(nproc, ckpt, store, *overrides):
    """Per-step (loss, grad_norm) of a `megawan train` run on `nproc` ranks."""
    _PORT[0] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_PORT[0]), "-m", "megawan.cli", "train", "--config", CONFIG, f"data.store={store}",
           f"checkpoint.dir={ckpt}", *COMMON, *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    rows = [r for r in read_metrics(os.path.join(ckpt, "logs", "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    return np.array([r["loss"] for r in rows]), np.array([r["grad_norm"] for r in rows])


@pytest.fixture(scope="module")
def one_rank(store, tmp_path_factory):
    return _train(1, str(tmp_path_factory.mktemp("one") / "ckpt"), store)


@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallel.pipeline_parallel=2"]),
    (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]),
    (4, ["parallel.pipeline_parallel=2", "parallel.tensor_parallel=2"]),
], ids=["pp2", "pp2-interleaved", "tp2xpp2"])
def test_pipeline_layouts_train_the_one_rank_model(store, one_rank, tmp_path, nproc, layout):
    losses, grad_norms = _train(nproc, str(tmp_path / "ckpt"), store, *layout)
    ref_losses, ref_grad_norms = one_rank
    np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=1e-5)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
