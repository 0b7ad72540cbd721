"""The README's first command, whole: synthetic clips -> precomputed latents -> `megawan train` on 4 CPU ranks
(TP2 x DP2) -> checkpoints + validation -> the colour check on held-out prompts -> mp4 per prompt.

The tiny model must learn the task: for the held-out prompts (captions such as "a green square moves up",
clips never trained on), the dominant colour of the generated frames — the palette colour nearest to the
median of the pixels that are clearly not background (megawan.data.synthetic.dominant_color) — is the
caption's colour for at least 90 % of them. And the whole job fits the README's promise of 15 minutes."""

import json
import os

from megawan.demo import run_demo
from megawan.training.validation import frames_of


def test_demo_runs_end_to_end_and_learns_the_colours(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(str(out))
    assert summary["seconds"] < 15 * 60, summary
    assert summary["color_accuracy"] >= 0.9, json.load(open(out / "color_accuracy.json"))

    assert (out / "checkpoints" / "latest").exists()
    assert os.path.exists(summary["contact_sheet"])
    for prompt, path in summary["videos"].items():
        frames = frames_of({"video": path})
        assert frames.shape == (17, 32, 48, 3), (prompt, frames.shape)
    saved = json.load(open(out / "summary.json"))
    assert saved["color_accuracy"] == summary["color_accuracy"]
