"""The other ways into tools/curate.py: a folder of clips with .txt captions (the data on-ramp; files it cannot
list are reported too), and a scorer plugged in by dotted path (the TextArea example: a clip with a caption burnt
in is rejected with the scorer's name as its reason)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megawan.config.curate import load_curate_config
from megawan.config.fields import ConfigError
from megawan.curation.decide import measure_clip
from megawan.curation.scorers import TextArea, build_scorers
from megawan.data.manifest import ManifestEntry
from megawan.demo.shapes import write_broken
from megawan.utils.media import write_video
from tests.curate_clips import FPS, blurred, clean
from tests.test_curate import curate_tool


def burnt_in(frames: np.ndarray) -> np.ndarray:
    """Subtitles over the lower part of each frame (on a smooth background: the texture of `clean` is as busy as
    letters, see TextArea)."""
    import cv2

    out = np.empty_like(frames)
    for t, f in enumerate(frames):
        out[t] = cv2.GaussianBlur(f, (0, 0), 1.5)
        cv2.putText(out[t], "SALE 50% OFF", (2, f.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return out


def test_text_area_scorer_plugged_in_by_dotted_path(tmp_path):
    cfg = load_curate_config(None, ["scorers=[{name: subtitles, target: 'megawan.curation.scorers:TextArea', "
                                    "options: {min_height: 5}, max: 0.1}]"])
    scorers = build_scorers(cfg.scorers)
    frames = clean(3)
    assert TextArea()(burnt_in(frames)[:3]) > 0.1 > TextArea()(frames[:3])
    records = {}
    for name, clip in (("plain", frames), ("subtitled", burnt_in(frames))):
        path = str(tmp_path / f"{name}.mp4")
        write_video(path, clip, fps=FPS)
        records[name] = measure_clip(ManifestEntry(name, path, name), cfg, scorers)
    assert "subtitles" in records["subtitled"]["reasons"] and not records["subtitled"]["keep"]
    assert records["plain"]["reasons"] == [] and records["plain"]["measures"]["subtitles"] < 0.1


def test_a_scorer_that_cannot_be_loaded_is_one_line_naming_it():
    with pytest.raises(ConfigError, match=r"scorers\[0\].target: cannot import 'no_such_package'"):
        build_scorers(load_curate_config(None, ["scorers=[{name: aesthetic, target: no_such_package.Model}]"]).scorers)
    with pytest.raises(ConfigError, match=r"scorers\[0\].name: 'blurry' is taken"):
        load_curate_config(None, ["scorers=[{name: blurry, target: megawan.curation.scorers.TextArea}]"])
    with pytest.raises(ConfigError, match=r"scorers\[0\].options: .*refused"):
        build_scorers(load_curate_config(None, ["scorers=[{name: t, target: megawan.curation.scorers.TextArea, "
                                                "options: {size: 3}}]"]).scorers)


def test_a_folder_with_captions(tmp_path):
    folder = tmp_path / "raw"
    (folder / "sub").mkdir(parents=True)
    write_video(str(folder / "a.mp4"), clean(5), fps=FPS)
    write_video(str(folder / "sub" / "b.mp4"), blurred(6), fps=FPS)
    write_broken(str(folder / "c.mp4"), "garbage")
    shutil.copyfile(folder / "a.mp4", folder / "uncaptioned.mp4")
    for name in ("a", "sub/b", "c"):
        (folder / f"{name}.txt").write_text(f"caption of {name}")
    out = tmp_path / "out"
    assert curate_tool().main(["--manifest", str(folder), "--out", str(out), "--no-progress", "report.html=false"]) == 0
    report = {r["id"]: r for r in map(json.loads, open(out / "report.jsonl", encoding="utf-8"))}
    assert report["a"]["keep"] and report["a"]["caption"] == "caption of a"
    assert report["sub/b"]["reasons"] == ["blurry"]
    assert report["c"]["reasons"] == ["undecodable"] and "c.mp4" in report["c"]["path"]
    assert report["uncaptioned"]["reasons"] == ["no_caption"] and "no caption" in report["uncaptioned"]["error"]
    rows = [json.loads(line) for line in open(out / "manifest.jsonl", encoding="utf-8")]
    assert [r["id"] for r in rows] == ["a"] and rows[0]["caption"] == "caption of a"
