"""`megawan eval` on the session's tiny pipeline (tests/conftest.py `tiny_pipelines`, random weights): a run on
the synthetic suite writes the videos, OUT/LABEL/results.json (a row per sample) and a row of OUT/results.jsonl /
OUT/results.md; a second run (a prompt file, a VAE scored on clips) appends a second row beside the first, a
VAE-only run a third.
Bad input (a missing checkpoint, an empty prompt file, a label already used) ends in one line naming it."""

import json
import os

import pytest

from megawan.cli import main
from megawan.demo.shapes import write_synthetic_dataset
from megawan.parallel.launch import spawn_local

SIZE = ["--frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--device", "cpu"]


def _eval_rank(rank, args):
    assert main(["eval", *args, *SIZE]) == 0


def _eval(*args):
    """`megawan eval ARGS` as the command runs it, in a one-rank world forked from the test session's fork server
    (megawan.parallel.launch.spawn_local: torch and megatron-core imported once, not once per run)."""
    spawn_local(_eval_rank, world_size=1, args=(list(args),), preload=("megawan.cli", "megawan.evaluation.runner"))


@pytest.fixture(scope="module")
def pipelines(tiny_pipelines):
    return tiny_pipelines  # made once per session; these tests only read it


@pytest.fixture(scope="module")
def pipeline(pipelines):
    return str(pipelines / "megawan")  # a converted pipeline: what --ckpt takes (it carries its encoders)


def test_eval_writes_results_and_a_second_run_appends_a_row(pipelines, pipeline, tmp_path):
    out = tmp_path / "eval"
    _eval("--ckpt", pipeline, "--suite", "synthetic", "--suite-size", "3", "--out", str(out))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["megawan"] and rows[0]["prompts"] == "synthetic:3"
    assert rows[0]["settings"].startswith("9x32x48, 2 steps")
    results = json.loads((out / "megawan" / "results.json").read_text())
    samples = results["suite"]["samples"]
    assert [s["caption"] for s in samples] == ["a red circle moves left", "a green square moves right",
                                               "a blue triangle moves up"]
    for s in samples:  # random weights: whatever it drew is measured, and judged against the caption
        assert os.path.isfile(s["video"]) and os.path.isfile(os.path.splitext(s["video"])[0] + ".json")
        assert s["color_ok"] == (s["color"] == s["expected_color"])
    for check in ("color", "shape", "direction"):
        assert results["suite"][check] == rows[0][check] == sum(s[f"{check}_ok"] for s in samples) / 3
    assert (out / "results.md").read_text().count("\n| megawan |") == 1

    # another prompt set and a VAE on held-out clips, under another label: a second row, the first one kept
    (tmp_path / "prompts.txt").write_text("a yellow square moves down\n\n")
    clips = write_synthetic_dataset(str(tmp_path / "clips"), count=2, frames=9, height=32, width=48)
    _eval("--ckpt", pipeline, "--prompts", str(tmp_path / "prompts.txt"), "--label", "second", "--vae",
          f"tiny={pipelines}/official/Wan2.1_VAE.pth", "--vae-clips", clips, "--out", str(out))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["megawan", "second"]
    assert rows[1]["samples"] == 1 and rows[1]["prompts"] == str(tmp_path / "prompts.txt")
    assert 0 < rows[1]["vae_psnr"]["tiny"] < 60 and -1 <= rows[1]["vae_ssim"]["tiny"] <= 1  # random weights
    vae = json.loads((out / "second" / "results.json").read_text())["vae"]
    assert vae["samples"] == 2 and set(vae["vaes"]) == {"tiny"}  # both clips, cut to the generated 9x32x48
    table = (out / "results.md").read_text()
    assert table.count("\n| megawan |") == 1 and table.count("\n| second |") == 1

    # a VAE alone (no checkpoint, no process group): a third row, in the sizes given
    assert main(["eval", "--vae", f"{pipelines}/official/Wan2.1_VAE.pth", "--vae-clips", clips, "--vae-buckets",
                 "5x32x32", "1x32x32", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows[2]["label"] == "Wan2.1_VAE.pth" and rows[2]["ckpt"] is None and rows[2]["color"] is None
    vae = json.loads((out / "Wan2.1_VAE.pth" / "results.json").read_text())["vae"]
    assert set(vae["vaes"]["Wan2.1_VAE.pth"]["buckets"]) == {"5x32x32", "1x32x32"}


def test_bad_input_is_one_line(pipeline, tmp_path, capsys):
    def refused(*args):
        code = main(["eval", *args, "--out", str(tmp_path / "eval")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "no-such-ckpt" in refused("--ckpt", str(tmp_path / "no-such-ckpt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "--prompts" in refused("--ckpt", pipeline, "--prompts", str(tmp_path / "empty.txt"))
    assert "--reference and --i3d go together" in refused("--ckpt", pipeline, "--i3d", "x.pt")
    assert "--vae and --vae-clips" in refused("--vae", "x.pth")
    assert "--vae-buckets" in refused("--vae", "x.pth", "--vae-clips", str(tmp_path / "empty.txt"))
    assert "--vae nothing.pth: no such file" in refused("--ckpt", pipeline, "--vae", "a=nothing.pth", "--vae-clips",
                                                        str(tmp_path / "empty.txt"))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.jsonl").write_text(json.dumps({"label": "megawan"}) + "\n")
    assert "--label megawan" in refused("--ckpt", pipeline)
