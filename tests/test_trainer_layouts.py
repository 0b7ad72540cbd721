"""`megawan train` under every kind of parallelism trains the model one rank trains: 4 steps from a warm-up at
lr 0 (the first step changes nothing but the optimizer's moments, so a wrong gradient shows in the steps after
it) give one rank's loss and gradient norm at every step, in fp32, to 1e-5 relative.

The one rank trains the same global batches (data.global_batch_size 4 for videos, 8 for images) in micro-batches
of 2 that it accumulates; a layout with data parallelism splits each global batch over its replicas instead.
The noise and timestep of a sample come from its place in the global batch, not from the rank that holds it,
so every layout sees the same inputs. Only the order of float sums differs (micro-batches accumulated on one
rank vs. gradients reduced over DP, CP or the pipeline's shared embeddings): about 1e-7 relative here.

The step-1 gradient norm is the sharp check: the head starts at zero, so the step-1 loss is the same for any
weights, while the gradient of the head depends on every block before it (a stage that initialised its blocks
or its copy of the shared embeddings differently from one rank shows here first)."""

import numpy as np
import pytest
from training_runs import grad_norms, losses, run

# 4 blocks: 2 stages x 2 chunks each; no checkpoint or EMA: only the steps are compared
COMMON = ["model.num_layers=4", "train.steps=4", "optimizer.warmup_steps=2", "train.precision=fp32",
          "train.ema_decay=0", "checkpoint.every=100", "parallel.tensor_parallel=1"]


def _train(nproc, ckpt, store, *overrides):
    """Per-step (loss, grad_norm) of a `megawan train` run on `nproc` ranks."""
    code, log = run(nproc, ckpt, store, *COMMON, *overrides)
    assert code == 0, log
    assert len(losses(ckpt)) == 4
    return np.array(losses(ckpt)), np.array(grad_norms(ckpt))


@pytest.fixture(scope="module")
def one_rank(tiny_store, tmp_path_factory):
    return _train(1, str(tmp_path_factory.mktemp("one") / "ckpt"), tiny_store)


@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallel.pipeline_parallel=2"]),
    (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]),
    (4, ["parallel.pipeline_parallel=2", "parallel.tensor_parallel=2"]),
    # Ulysses all-to-alls inside each stage, between the stages' sends (ring attention under PP trains alike)
    (4, ["parallel.pipeline_parallel=2", "parallel.context_parallel=2"]),
    # each replica takes half of every global batch: half the micro-batches one rank accumulates per step
    (2, []),
], ids=["pp2", "pp2-interleaved", "tp2xpp2", "pp2xcp2", "dp2"])
def test_layouts_train_the_one_rank_model(tiny_store, one_rank, tmp_path, nproc, layout):
    got_losses, got_grad_norms = _train(nproc, str(tmp_path / "ckpt"), tiny_store, *layout)
    ref_losses, ref_grad_norms = one_rank
    np.testing.assert_allclose(got_grad_norms, ref_grad_norms, rtol=1e-5)
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
