"""The data on-ramp: a folder of clips with .txt captions (or a CSV) -> tools/make_manifest.py -> a manifest
precompute reads; WebDataset tar shards read by precompute as they are. The same clips through both routes give
the same latents and text states, sample by sample; unreadable and uncaptioned files are reported, never fatal."""

import importlib.util
import io
import json
import os
import tarfile

import pytest
import torch

from megawan.data.precompute import PrecomputeJob, run_precompute
from megawan.data.store import LatentStore
from megawan.data.webdataset import ShardError, expand_braces, member_of, read_entries, read_shards
from megawan.demo.shapes import ShapeClip, render
from megawan.demo.tiny_assets import write_tiny_encoders
from megawan.utils.media import write_image, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = ["17x32x48", "1x32x48"]
CLIPS = {  # name in the folder -> (the clip, how its shard sample carries its caption)
    "a.mp4": (ShapeClip("red", "circle", "left"), "txt"),
    "sub/b.webm": (ShapeClip("blue", "square", "up"), "json"),
    "sub/c.png": (ShapeClip("green", "triangle", "down"), "txt"),
}


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three good files with captions, a clip without one, and a broken 'clip' with one."""
    root = tmp_path_factory.mktemp("onramp") / "dataset"
    (root / "sub").mkdir(parents=True)
    for i, (name, (clip, _)) in enumerate(CLIPS.items()):
        frames = render(clip, 17, 32, 48, seed=i)
        path = str(root / name)
        if name.endswith(".png"):
            write_image(path, frames[0])
        else:
            write_video(path, frames, codec="libvpx-vp9" if name.endswith(".webm") else "libx264")
        (root / name).with_suffix(".txt").write_text(clip.caption + "\n")
    write_video(str(root / "uncaptioned.mp4"), render(ShapeClip("red", "circle", "left"), 17, 32, 48))
    (root / "broken.mp4").write_bytes(b"not a video" * 50)
    (root / "broken.txt").write_text("a broken file")
    return root


def test_make_manifest_lists_the_good_files_and_reports_the_others(folder, capsys):
    out = str(folder / "manifest.jsonl")
    assert _tool("make_manifest").main([str(folder), "--out", out, "--no-progress"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == ["a", "sub/b", "sub/c"]
    assert {r["path"]: r["caption"] for r in rows} == {name: c.caption for name, (c, _) in CLIPS.items()}
    assert rows[0]["frames"] == 17 and rows[0]["source_fps"] == 16 and abs(rows[0]["duration"] - 17 / 16) < 1e-3
    assert rows[1]["frames"] == 17 and (rows[1]["width"], rows[1]["height"]) == (48, 32)  # webm: packets counted
    assert rows[2]["frames"] == 1 and "duration" not in rows[2]
    skipped = {r["id"]: r["reason"] for r in map(json.loads, open(out + ".skipped.jsonl"))}
    assert set(skipped) == {"broken", "uncaptioned"}
    assert "not a readable media file" in skipped["broken"] and "uncaptioned.txt is missing" in skipped["uncaptioned"]
    assert "3 entries (2 videos, 1 images); skipped 2" in capsys.readouterr().out

    (folder.parent / "empty").mkdir()
    (folder.parent / "empty" / "notes.txt").write_text("no media here")
    assert _tool("make_manifest").main([str(folder.parent / "empty"), "--out", str(folder.parent / "e.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_manifest.py: ") and "no videos" in err and "\n" not in err


def test_make_manifest_from_a_csv(folder, tmp_path, capsys):
    csv = folder / "list.csv"
    csv.write_text("video,text,start\na.mp4,a red circle,0.25\nsub/c.png,,\nmissing.mp4,gone,\n")
    out = tmp_path / "m.jsonl"
    assert _tool("make_manifest").main([str(csv), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 1 and rows[0]["id"] == "a@0.25" and rows[0]["start"] == 0.25
    assert rows[0]["path"] == str(folder / "a.mp4")  # outside the manifest's folder: absolute
    reasons = sorted(r["reason"] for r in map(json.loads, open(str(out) + ".skipped.jsonl")))
    assert reasons[0].endswith("file not found") and reasons[1] == "row 3: no caption"
    csv.write_text("file,caption\na.mp4,x\n")
    assert _tool("make_manifest").main([str(csv), "--out", str(out)]) == 2
    assert "no 'path' or 'video' column" in capsys.readouterr().err


def test_brace_patterns_and_shard_sources(tmp_path):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    for i in range(2):
        with tarfile.open(tmp_path / f"{i:06d}.tar", "w") as tar:
            for name, data in ((f"k{i}.txt", b"caption"), (f"k{i}{'.clip' * i}.mp4", b"x")):
                (tmp_path / name).write_bytes(data)
                tar.add(tmp_path / name, arcname=name)
    by_pattern = read_shards(str(tmp_path / "{000000..000001}.tar"))
    assert [e.id for e in by_pattern] == ["000000/k0", "000001/k1"]
    assert read_entries(str(tmp_path)) == by_pattern  # the folder of shards: the same entries, same order
    assert member_of(by_pattern[1].path) == (str(tmp_path / "000001.tar"), "k1.clip.mp4")  # field "clip.mp4"
    with pytest.raises(ShardError, match="000002.tar: shard not found"):
        read_shards(str(tmp_path / "{000000..000002}.tar"))
    with pytest.raises(ShardError, match="compressed tar"):
        read_entries(str(tmp_path / "x.tar.gz"))


def _shard(folder, path):
    """The folder's files as WebDataset samples 000000.., plus one without a caption and one broken member."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, (name, (clip, kind)) in enumerate(CLIPS.items()):
            add(f"{i:06d}.{name.rsplit('.', 1)[1]}", (folder / name).read_bytes())
            caption = clip.caption
            add(f"{i:06d}.{kind}", caption.encode() if kind == "txt" else json.dumps({"caption": caption}).encode())
        add("000003.mp4", (folder / "uncaptioned.mp4").read_bytes())
        add("000004.mp4", b"not a video" * 50)
        add("000004.txt", b"a broken file")


def _contents(path):
    store = LatentStore.open(path)
    return {s["id"]: s for b in store.buckets() for s in (store.read(b, i) for i in range(store.count(b)))}


def test_a_shard_and_the_folder_precompute_to_the_same_store(folder, tmp_path):
    enc = write_tiny_encoders(str(tmp_path / "encoders"))
    manifest = str(folder / "manifest.jsonl")
    if not os.path.exists(manifest):
        _tool("make_manifest").main([str(folder), "--out", manifest, "--no-progress"])
    (tmp_path / "shards").mkdir()
    _shard(folder, tmp_path / "shards" / "000000.tar")

    def job(source, out):
        return PrecomputeJob(manifest=source, out=str(tmp_path / out), vae=enc["vae"], vae_config=enc["vae_config"],
                             text_encoder=enc["text_encoder"], text_config=enc["text_config"],
                             tokenizer=enc["tokenizer"], buckets=BUCKETS, decode_backend="pyav", decode_workers=2)

    assert run_precompute(job(manifest, "folder.zarr"), progress=False)["written"] == 3
    # the shard on two ranks, one after the other: each rank takes its rows of the same entry list
    shards = job(str(tmp_path / "shards" / "{000000..000000}.tar"), "shard.zarr")
    written = [run_precompute(shards, rank=r, world_size=2, progress=False)["written"] for r in (1, 0)]
    assert sum(written) == 3 and min(written) >= 1

    folder_store, shard_store = _contents(str(tmp_path / "folder.zarr")), _contents(str(tmp_path / "shard.zarr"))
    names = {name: f"000000/{i:06d}" for i, name in enumerate(CLIPS)}
    assert set(shard_store) == set(names.values())
    for name, shard_id in names.items():
        a, b = folder_store[os.path.splitext(name)[0]], shard_store[shard_id]
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"]), name
        assert a["caption"] == b["caption"] and list(a["frame_indices"]) == list(b["frame_indices"])
        assert b["source"] == str(tmp_path / "shards" / "000000.tar" / f"{shard_id[7:]}.{name.rsplit('.', 1)[1]}")
    skipped = {r["id"]: r["reason"] for r in map(json.loads, open(str(tmp_path / "shard.zarr.skipped.jsonl")))}
    assert set(skipped) == {"000000/000003", "000000/000004"}
    assert "no caption" in skipped["000000/000003"] and "not a readable media file" in skipped["000000/000004"]
    again = run_precompute(shards, progress=False)  # resumed by id: the same ids on the next run, nothing to do
    assert again["written"] == 0 and again["skipped_now"] == 0 and again["already_done"] == 5
