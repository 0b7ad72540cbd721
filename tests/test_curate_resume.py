"""tools/curate.py SIGKILLed part way, then run again: every clip is decided exactly once and the re-run measures
only what was missing. Ranks (run here one after another, in one process: a torchrun launch costs more than the
whole CI budget of these tests) measure disjoint slices, and rank 0 reports them all after the barrier."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from megawan.config.curate import load_curate_config
from megawan.curation.runner import measure_slice, part_path, read_parts, run_curation
from megawan.data.manifest import read_manifest
from tests.curate_clips import write_clip_set
from tests.test_curate import ROOT, curate_tool

COPIES = 2  # the clip set listed twice (ids name-0, name-1): enough clips for the kill to land inside the run


def _part_lines(out: str) -> int:
    folder = os.path.join(out, "parts")
    if not os.path.isdir(folder):
        return 0
    return sum(open(os.path.join(folder, n), "rb").read().count(b"\n") for n in os.listdir(folder))


def test_killed_and_resumed_decides_every_clip_once(tmp_path, capsys):
    made = write_clip_set(str(tmp_path / "clips"), clean_count=2, variants=False)
    manifest = tmp_path / "clips" / "many.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for copy in range(COPIES):
            for name, path, _ in made:
                f.write(json.dumps({"id": f"{name}-{copy}", "path": path, "caption": name}) + "\n")
    total = COPIES * len(made)
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "curate.py"), "--manifest", str(manifest), "--out", out,
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _part_lines(out) < 4:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0]
    partial = _part_lines(out)
    assert proc.returncode == -signal.SIGKILL, log
    assert 0 < partial < total, f"the kill landed outside the run ({partial} of {total} decided)\n{log}"
    assert not os.path.exists(os.path.join(out, "report.jsonl"))

    capsys.readouterr()
    assert curate_tool().main(["--manifest", str(manifest), "--out", out, "--no-progress", "report.html=false"]) == 0
    assert f"measured {total - partial} clips, already done {partial}" in capsys.readouterr().out
    with open(os.path.join(out, "report.jsonl"), encoding="utf-8") as f:
        report = [json.loads(line) for line in f]
    ids = [e.id for e in read_manifest(str(manifest))]
    assert [r["id"] for r in report] == ids  # every clip once, in order
    lines = [json.loads(line)["id"] for line in open(part_path(out, 0), encoding="utf-8")]
    assert sorted(lines) == sorted(ids), "each clip measured once across the killed run and the re-run"
    by_id = {r["id"]: r for r in report}
    for name, _, _ in made:  # later listings of a clip are duplicates (of its first listing, or of its original)
        if by_id[f"{name}-0"]["measures"]:
            assert all("duplicate" in by_id[f"{name}-{c}"]["reasons"] for c in range(1, COPIES)), name


def test_rank_slices_are_disjoint_and_a_rerun_measures_nothing(tmp_path):
    made = write_clip_set(str(tmp_path / "clips"), clean_count=1, variants=False)[:6]
    manifest = tmp_path / "clips" / "manifest.jsonl"
    entries = read_manifest(str(manifest))[:6]
    cfg = load_curate_config(None, ["report.html=false"])
    out = str(tmp_path / "out")
    os.makedirs(out)
    assert measure_slice(entries, out, cfg, rank=1, world_size=2, progress=False)["measured"] == 3
    summary = run_curation(entries, out, cfg, rank=0, world_size=2, progress=False)
    assert summary["measured"] == 3 and summary["clips"] == 6
    assert set(read_parts(out)) == {name for name, _, _ in made}
    again = run_curation(entries, out, cfg, progress=False)
    assert again["measured"] == 0 and again["already_done"] == 6
    changed = load_curate_config(None, ["report.html=false", "thresholds.blur_min=99"])
    try:
        run_curation(entries, out, changed, progress=False)
    except Exception as e:
        assert "another config" in str(e) and "config.json" in str(e)
    else:
        raise AssertionError("a re-run with another config must be refused")
