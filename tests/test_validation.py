"""Validation during `megawan train`: every rank samples the held-out prompts together and measures the
held-out loss, in the run's own layout. The same weights (a TP2 checkpoint, warm-started with a vanishing
learning rate) validated under TP2, TP1 x CP2 (Ulysses) and PP2 give the same held-out loss and the same
sampled latents; the videos, strips, contact sheet and rows of samples.jsonl are written where the docs say.
(Weights trained separately in each layout are not compared: Adam's first steps move every weight by about
±lr whatever the size of its gradient, so rounding-level gradient differences become lr-sized.)"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megawan.training.metrics import read_metrics
from megawan.training.validation import frames_of, read_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_train.yaml")
_PORT = [29860]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megawan.demo.tiny_dataset import make_tiny_dataset

    root = tmp_path_factory.mktemp("validation")
    store, encoders = make_tiny_dataset(str(root), videos=12, images=8, held_out_videos=3, held_out_images=2)
    return store, str(root / "held_out.zarr"), encoders


def _run(ckpt, store, *overrides):
    _PORT[0] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_PORT[0]),
           "-m", "megawan.cli", "train", "--config", CONFIG, f"data.store={store}", f"checkpoint.dir={ckpt}",
           *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Weights worth validating: two TP2 steps with text dropout."""
    ckpt = str(tmp_path_factory.mktemp("trained") / "ckpt")
    _run(ckpt, data[0], "train.steps=2", "train.text_dropout=0.25")
    return ckpt


def _validate(tmp_path, data, trained, name, *layout):
    store, held_out, encoders = data
    ckpt = str(tmp_path / name)
    _run(ckpt, store, f"checkpoint.init_from={trained}", "optimizer.lr=1e-12", "optimizer.warmup_steps=0",
         "train.steps=1", "validation.every=1", f"validation.store={held_out}", f"validation.vae={encoders['vae']}",
         "validation.steps=4", "validation.guidance=3.0", "validation.num_samples=3", "validation.batch_size=2",
         *layout)
    rows = read_metrics(os.path.join(ckpt, "logs", "metrics.jsonl"))
    val = [r for r in rows if "val/loss" in r]
    assert len(val) == 1 and val[0]["step"] == 1
    folder = os.path.join(ckpt, "logs", "validation", "step-0000001")
    return val[0], read_samples(folder), folder


def test_validation_is_the_same_in_every_layout(tmp_path, data, trained):
    ref_metrics, ref_rows, folder = _validate(tmp_path, data, trained, "tp2")
    # what was written: 3 held-out clips of the first video bucket, decoded with the VAE
    assert [r["id"] for r in ref_rows] == [f"held_out_clip_{i:05d}" for i in range(3)]
    for row in ref_rows:
        assert row["caption"].startswith("a ") and os.path.exists(row["strip"])
        frames = frames_of(row)
        assert frames.shape == (17, 32, 48, 3) and frames.dtype == np.uint8
        assert torch.load(row["latents"]).shape == (4, 5, 4, 6)
    assert os.path.exists(os.path.join(folder, "contact_sheet.png"))
    assert all(os.path.isfile(row["preview"]) for row in ref_rows)  # the animated .webp beside each mp4
    events = EventAccumulator(os.path.join(folder, "..", "..", "tensorboard"), size_guidance={"images": 0})
    events.Reload()  # logging.tensorboard=auto: events with the held-out loss, each clip and the contact sheet
    assert "val/loss" in events.Tags()["scalars"] and set(events.Tags()["images"]) == {
        *(f"val/video/{r['id']}" for r in ref_rows), "val/contact_sheet"}
    assert set(ref_metrics) >= {"val/loss", "val/loss_t0.10", "val/loss_t0.90", "val/seconds"}
    assert np.isfinite(ref_metrics["val/loss"])

    for name, layout in [("cp2", ("parallel.tensor_parallel=1", "parallel.context_parallel=2")),
                         ("pp2", ("parallel.tensor_parallel=1", "parallel.pipeline_parallel=2"))]:
        metrics, rows, _ = _validate(tmp_path, data, trained, name, *layout)
        for key in ("val/loss_t0.10", "val/loss_t0.50", "val/loss_t0.90"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), (name, key)
        for row, ref in zip(rows, ref_rows):
            a, b = torch.load(row["latents"]), torch.load(ref["latents"])
            assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), (name, row["id"])


def test_validation_config_is_checked_before_training(tmp_path, data):
    from megawan.config import ConfigError, load_config
    from megawan.training.trainer import preflight

    store, held_out, encoders = data
    base = [f"data.store={store}", "validation.every=2"]
    with pytest.raises(ConfigError, match="validation.store: validation.every is set"):
        load_config(CONFIG, base)
    cfg = load_config(CONFIG, base + [f"validation.store={tmp_path}/missing.zarr"])
    with pytest.raises(ConfigError, match="validation.store"):
        preflight(cfg, 2)
    cfg = load_config(CONFIG, base + [f"validation.store={held_out}", "validation.bucket=9x64x64"])
    with pytest.raises(ConfigError, match="validation.bucket: 9x64x64"):
        preflight(cfg, 2)
    with pytest.raises(ConfigError, match="validation.sampler"):
        load_config(CONFIG, base + [f"validation.store={held_out}", "validation.sampler=ddim"])
