"""tools/curate.py on a set of tiny clips with known faults (tests/curate_clips.py): every fault flagged with its
reason, clean clips kept, the two-shot clip split at its cut, duplicates clustered with their original, broken
files reported (never the run's end), and the curated manifest read back as precompute reads it."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from megawan.config.curate import REASONS, load_curate_config
from megawan.config.fields import ConfigError
from megawan.data.manifest import read_manifest
from tests.curate_clips import CUT_FRAME, FPS, LETTERBOX_CROP, MILD, PILLARBOX_CROP, write_clip_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def curate_tool():
    spec = importlib.util.spec_from_file_location("curate", os.path.join(ROOT, "tools", "curate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """(expected {id: reasons}, {id: report line}, out folder) of one run over the clip set."""
    root = tmp_path_factory.mktemp("curate")
    made = write_clip_set(str(root / "clips"))
    out = str(root / "out")
    assert curate_tool().main(["--manifest", str(root / "clips" / "manifest.jsonl"), "--out", out,
                               "--no-progress"]) == 0
    with open(os.path.join(out, "report.jsonl"), encoding="utf-8") as f:
        report = [json.loads(line) for line in f]
    assert [r["id"] for r in report] == [name for name, _, _ in made]  # one line per input clip, in order
    return {name: reasons for name, _, reasons in made}, {r["id"]: r for r in report}, out


def test_every_reason_found_precision_recall(curated):
    """The clear case of each fault gets exactly its reason; over the milder second cases too (MILD), no clip gets
    a reason it should not (precision 1) and each reason finds at least half its clips (printed for the record)."""
    expected, report, _ = curated
    lines, recalls = [], {}
    for reason in REASONS:
        truth = {i for i, reasons in expected.items() if reason in reasons}
        found = {i for i, r in report.items() if reason in r["reasons"]}
        if not truth and not found:
            continue  # no_caption: a folder's (test_curate_inputs)
        hit = len(truth & found)
        precision = hit / len(found) if found else 1.0
        recalls[reason] = hit / len(truth) if truth else 1.0
        lines.append(f"{reason:13s} precision {precision:.2f} recall {recalls[reason]:.2f} (clips {len(truth)}, "
                     f"flagged {len(found)}, missed {sorted(truth - found)})")
        assert precision == 1.0, lines[-1]
    print("\n" + "\n".join(lines))
    assert min(recalls.values()) >= 0.5, lines
    wrong = {i: (sorted(r["reasons"]), sorted(expected[i])) for i, r in report.items()
             if i not in MILD and sorted(r["reasons"]) != sorted(expected[i])}
    assert not wrong, f"reasons (found, expected): {wrong}"
    for i, r in report.items():
        assert r["keep"] == all(x == "letterbox" for x in r["reasons"]), i
        if i not in MILD:
            assert r["keep"] == all(x == "letterbox" for x in expected[i]), i


def test_two_shots_split_at_the_cut(curated):
    _, report, out = curated
    scenes = report["two_scenes"]["scenes"]
    assert len(scenes) == 2
    assert abs(scenes[0][1] - CUT_FRAME / FPS) <= 2 / FPS and scenes[0][1] == scenes[1][0]
    rows = {e.id: e for e in read_manifest(os.path.join(out, "manifest.jsonl"))}  # precompute's reader
    shots = sorted((e for e in rows.values() if e.path.endswith("two_scenes.mp4")), key=lambda e: e.start)
    assert [(e.start, e.end) for e in shots] == [tuple(s) for s in scenes]
    assert {e.caption for e in shots} == {"clip two_scenes"}
    kept = {i for i, r in report.items() if r["keep"]}
    assert {e.id.split("@")[0] for e in rows.values()} == kept  # every kept clip, nothing else


def test_letterbox_kept_with_its_crop(curated):
    _, report, out = curated
    r = report["letterbox"]
    assert r["keep"] and r["reasons"] == ["letterbox"]
    assert all(abs(a - b) <= 2 for a, b in zip(r["crop"], LETTERBOX_CROP)), r["crop"]
    assert all(abs(a - b) <= 2 for a, b in zip(report["pillarbox"]["crop"], PILLARBOX_CROP))
    assert report["clean0"]["crop"] is None
    rows = {e.id: e for e in read_manifest(os.path.join(out, "manifest.jsonl"))}  # precompute cuts to the crop
    assert rows["letterbox"].crop == tuple(r["crop"]) and rows["pillarbox"].crop == tuple(report["pillarbox"]["crop"])
    assert rows["clean0"].crop is None


def test_probe_of_each_clip(curated):
    """The container's answer, read in the measuring pass (audio and rotation: tests/test_curate_probe.py)."""
    _, report, _ = curated
    assert report["clean0"]["probe"] == {"container": "mov,mp4,m4a,3gp,3g2,mj2", "codec": "h264",
                                         "duration_s": 2.0, "fps": 16.0, "width": 64, "height": 48, "rotation": 0,
                                         "has_audio": False, "audio_codec": None}
    assert report["broken_audio"]["probe"] is None  # no video stream: nothing measured


def test_duplicates_clustered_with_their_original(curated):
    _, report, _ = curated
    assert report["copy_exact"]["duplicate_of"] == "clean0"
    assert report["copy_rescaled"]["duplicate_of"] == "clean0"  # 48x36, another bitrate: the larger one is kept
    assert report["clean0"]["keep"] and report["clean0"]["duplicate_of"] is None
    assert all(r["duplicate_of"] is None for i, r in report.items() if not i.startswith("copy"))


def test_motion_classes(curated):
    _, report, _ = curated
    assert report["static"]["measures"]["motion_class"] == "static"
    assert report["shaky"]["measures"]["motion_class"] == "shaky"
    assert report["clean1"]["measures"]["motion_class"] == "camera"  # a slow pan with a small object
    assert report["objects_only"]["measures"]["motion_class"] == "good"  # a still camera, a moving object
    assert report["clean1"]["motion"] > report["static"]["motion"]


def test_broken_files_reported_not_fatal(curated):
    _, report, _ = curated
    for name, reason in (("broken_garbage", "undecodable"), ("broken_empty", "zero_length"),
                         ("broken_audio", "no_video"), ("past_end", "zero_length")):
        r = report[name]
        assert r["reasons"] == [reason] and not r["keep"]
        assert os.path.basename(r["path"]) in r["error"]  # the message names the file


def test_html_report(curated):
    _, report, out = curated
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    for name in ("blur", "motion", "jitter", "border"):
        assert f"report/hist_{name}.png" in page and os.path.getsize(os.path.join(out, "report", f"hist_{name}.png"))
    thumbs = os.listdir(os.path.join(out, "report", "thumbs"))
    kept, blurry = sum(r["keep"] for r in report.values()), sum("blurry" in r["reasons"] for r in report.values())
    assert thumbs and f"<h2>blurry ({blurry})</h2>" in page and f"<h2>kept ({kept})</h2>" in page


def test_absurd_threshold_refused_naming_the_field(tmp_path, capsys):
    with pytest.raises(ConfigError, match="thresholds.blur_min"):
        load_curate_config(None, ["thresholds.blur_min=-1"])
    with pytest.raises(ConfigError, match="thresholds.overexposed_max"):
        load_curate_config(None, ["thresholds.overexposed_max=3"])
    with pytest.raises(ConfigError, match="did you mean 'static_max'"):
        load_curate_config(None, ["thresholds.statc_max=1"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    assert curate_tool().main(["--manifest", str(manifest), "--out", str(tmp_path / "o"),
                               "thresholds.blur_min=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["curate.py: thresholds.blur_min: -1.0 is negative"]


def test_example_config_loads():
    cfg = load_curate_config(os.path.join(ROOT, "examples", "configs", "curate.yaml"))
    assert cfg.thresholds.blur_min > 0 and cfg.scorers and cfg.scorers[0].name == "text_area"
