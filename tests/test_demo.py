"""The README's first command, whole: synthetic clips -> precomputed latents -> `megawan train` on 4 CPU ranks
(TP2 x DP2) -> checkpoints + validation -> the colour check on held-out prompts -> `megawan generate` mp4 per
prompt, within the README's 15 minutes.

The tiny VAE is the session's (tests/conftest.py `trained_encoders`: what the demo itself trains, trained once
and shared with tests/test_tiny_vae_colors.py); its training time counts towards the 15 minutes. The run is the
session's too (tests/conftest.py `demo_run`): tests/test_lora_task.py fine-tunes its checkpoint.

The colour check: for each of the 24 held-out prompts, the palette colour nearest to the median of the
generated pixels that are clearly not background (megawan.demo.shapes.dominant_color) against the colour
the caption names. The tiny model must get at least 90 % right."""

import json
import os

from megawan.demo.tiny_assets import TINY_VAE_STEPS
from megawan.training.metrics import read_metrics
from megawan.training.validation import frames_of


def test_demo_runs_end_to_end(demo_run):
    out, summary = demo_run  # run_demo(out, encoders=trained_encoders): what `megawan demo` runs, 1200 steps
    assert summary["encoders"]["vae_training"]["steps"] == TINY_VAE_STEPS  # the VAE the demo trains
    assert summary["seconds"] + summary["encoders"]["vae_training"]["seconds"] < 15 * 60, summary

    assert (out / "checkpoints" / "latest").exists()
    assert os.path.exists(summary["contact_sheet"])
    rows = read_metrics(summary["metrics"])
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(train) == 1200 // 10 and len(val) == 1
    assert val[0] < 0.9 * train[0]  # it learned something: the held-out loss is well under the first step's
    colours = json.load(open(out / "color_accuracy.json"))
    assert colours["total"] == 24 and colours["accuracy"] >= 0.9, colours
    assert sorted(os.listdir(out / "samples")) == sorted(os.path.basename(p) for p in summary["videos"].values())
    for prompt, path in summary["videos"].items():
        frames = frames_of({"video": path})
        assert frames.shape == (17, 32, 48, 3), (prompt, frames.shape)
