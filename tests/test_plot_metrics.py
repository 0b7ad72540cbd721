"""tools/plot_metrics.py: the loss by real step (a resumed run's re-logged steps once, their last value), the
held-out loss beside it, a smoothing window in steps; a missing or empty metrics file is one line, exit 2."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from megawan.training.loss_plot import load_curves, smooth_over_steps

sys.path.insert(0, "tools")


@pytest.fixture
def metrics(tmp_path):
    """Logged every 10 steps up to 100; killed after 60 and resumed from the checkpoint at 40, so steps 50 and
    60 come twice (the file of a run from before the logger dropped such rows); validation at 50 and 100."""
    rows = [{"step": s, "loss": 1.0 - s / 200, "lr": 1e-3, "bucket": "5x32x48"} for s in range(10, 70, 10)]
    rows.append({"step": 50, "val/loss": 0.9, "val/seconds": 1.0})
    rows += [{"step": s, "loss": 0.5 - s / 1000, "lr": 5e-4, "bucket": "5x32x48"} for s in range(50, 110, 10)]
    rows += [{"step": 70, "loss": None, "lr": 5e-4}, {"step": 100, "val/loss": 0.45}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_are_by_step_with_the_last_value_of_relogged_steps(metrics):
    curves = load_curves(str(metrics))
    assert curves.steps.tolist() == [10, 20, 30, 40, 50, 60, 80, 90, 100]  # 70: re-logged as skipped (null)
    assert curves.loss[:4].tolist() == [0.95, 0.9, 0.85, 0.8]
    assert curves.loss[4:6].tolist() == [0.45, 0.44]  # the resumed run's values
    assert curves.lr[-1] == 5e-4
    assert curves.val_steps.tolist() == [50, 100] and curves.val_loss.tolist() == [0.9, 0.45]


def test_smoothing_window_is_in_steps_not_rows():
    steps, values = np.array([10, 20, 30, 40]), np.array([4.0, 2.0, 6.0, 0.0])
    assert smooth_over_steps(steps, values, 20).tolist() == [4.0, 3.0, 4.0, 3.0]  # 2 rows at log_every=10
    assert smooth_over_steps(steps, values, 1).tolist() == values.tolist()
    assert smooth_over_steps(np.array([1, 2, 3]), np.array([3.0, 0.0, 3.0]), 2).tolist() == [3.0, 1.5, 1.5]


def test_tool_writes_the_plot_and_refuses_missing_or_empty_files_in_one_line(metrics, tmp_path, capsys):
    from plot_metrics import main

    out = tmp_path / "loss.png"
    assert main([str(metrics), "--out", str(out), "--smooth", "30"]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    said = capsys.readouterr().out
    assert "steps 10..100" in said and "held-out loss 0.4500 at step 100" in said
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, why in ((empty, "no training loss logged yet"), (tmp_path / "none.jsonl", "no such metrics file")):
        assert main([str(path), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"plot_metrics.py: {path}: {why}") and err.count("\n") == 1
