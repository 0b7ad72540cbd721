"""Data honesty: a clip goes to the longest bucket it fills, or is skipped as too short; never padded with copies
of its last frame. Every decode path (PyAV, DALI on the CPU, DALI's GPU branch with the CPU standing in) counts
the frames a clip has the same way (`decoding.available_frames`) and picks the same bucket from that count.

Each source frame k is a flat grey of level 10 + 3 k, so a prepared clip says which source frame each of its
frames is: they must be 0, 1, …, T - 1, distinct and in order (the clips are written at the target 16 fps)."""

import json
import os

import numpy as np
import pytest

from megawan import capabilities
from megawan.data.buckets import Bucket, parse_buckets
from megawan.data.decoding import available_frames
from megawan.data.manifest import ManifestEntry
from megawan.data.precompute import PrecomputeJob, prepare, run_precompute
from megawan.data.store import LatentStore
from megawan.demo.tiny_assets import write_tiny_encoders
from megawan.utils.media import write_image, write_video

pytestmark = pytest.mark.reliability  # the reliability suite: docs/reliability.md

BUCKETS = parse_buckets(["81x32x32", "33x32x32", "17x32x32", "1x32x32"])
LENGTHS = (1, 9, 16, 17, 33, 81)
# frames in the source -> the bucket's frame count, or None for "too short for any bucket"
EXPECTED = {1: 1, 9: None, 16: None, 17: 17, 33: 33, 81: 81}


def numbered(frames: int) -> np.ndarray:
    levels = 10 + 3 * np.arange(frames, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, 32, 32, 3)).copy()


def source_frames(video) -> list:
    """The source frame number of each frame of a prepared [3, T, H, W] clip in [-1, 1]."""
    level = (video.cpu().float().mean(dim=(0, 2, 3)) + 1) * 127.5
    return np.round((level.numpy() - 10) / 3).astype(int).tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("short")
    paths = {}
    for n in LENGTHS:
        paths["mp4", n] = str(folder / f"c{n}.mp4")
        write_video(paths["mp4", n], numbered(n), fps=16)
        paths["webm", n] = str(folder / f"c{n}.webm")  # VP9: what DALI's CPU decoder reads
        write_video(paths["webm", n], numbered(n), fps=16, codec="libvpx-vp9")
    write_image(str(folder / "still.png"), numbered(1)[0])
    paths["png"] = str(folder / "still.mp4")  # a PNG renamed .mp4: one frame, whatever the name says
    os.rename(folder / "still.png", paths["png"])
    return paths


def check(item, frames: int) -> None:
    want = EXPECTED[frames]
    if want is None:
        assert item.bucket is None and item.video is None
        assert item.skip_reason.startswith(f"too short for any bucket ({frames} frames)"), item.skip_reason
        return
    assert item.skip_reason is None and item.bucket == Bucket(want, 32, 32)
    assert source_frames(item.video) == list(range(want))  # the clip's own frames, distinct, in order


@pytest.mark.parametrize("frames", LENGTHS)
def test_pyav_clip_lands_in_the_longest_bucket_it_fills(clips, frames):
    check(prepare(ManifestEntry(f"c{frames}", clips["mp4", frames], "grey"), BUCKETS, 16, "pyav"), frames)


def test_without_the_longest_bucket_a_long_clip_takes_the_next(clips):
    item = prepare(ManifestEntry("c81", clips["mp4", 81], "grey"), BUCKETS[:3], 16, "pyav")  # 1, 17, 33
    assert item.bucket == Bucket(33, 32, 32) and source_frames(item.video) == list(range(33))
    no_images = prepare(ManifestEntry("c1", clips["mp4", 1], "grey"), BUCKETS[1:], 16, "pyav")
    assert no_images.skip_reason.startswith("too short for any bucket (1 frame) at 16 fps"), no_images.skip_reason


def test_a_window_past_the_end_adds_no_frames(clips):
    # a manifest window of 2 s on a 17-frame (1.06 s) clip holds the clip's 17 frames, not 33
    item = prepare(ManifestEntry("w", clips["mp4", 17], "grey", start=0.0, end=2.0), BUCKETS, 16, "pyav")
    assert item.bucket == Bucket(17, 32, 32) and source_frames(item.video) == list(range(17))
    # from frame 8 on, 9 frames remain: too short for 17
    late = prepare(ManifestEntry("l", clips["mp4", 17], "grey", start=0.5), BUCKETS, 16, "pyav")
    assert late.skip_reason.startswith("too short for any bucket (9 frames)"), late.skip_reason
    times = np.arange(17) / 16
    assert len(available_frames(times, 16, end=10.0)) == 17 and len(available_frames(times, 16, end=0.5)) == 8
    assert len(available_frames(times, 8)) == 9  # 1.06 s at 8 fps: t = 0, 1/8, …, 1


def test_a_png_named_mp4_stays_one_frame(clips):
    item = prepare(ManifestEntry("png", clips["png"], "grey"), BUCKETS, 16, "pyav")
    assert item.bucket == Bucket(1, 32, 32) and source_frames(item.video) == [0]


@pytest.fixture
def dali():
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the [test] extra installs it on Linux)")
    from megawan.data import dali

    return dali


@pytest.mark.parametrize("frames", LENGTHS)
def test_every_dali_path_counts_and_buckets_like_pyav(dali, clips, monkeypatch, frames):
    path = clips["webm", frames]
    pyav = prepare(ManifestEntry("p", path, "grey"), BUCKETS, 16, "pyav")
    check(pyav, frames)
    check(prepare(ManifestEntry("d", path, "grey"), BUCKETS, 16, "dali-cpu"), frames)
    assert len(dali.select_frames(path, fps=16, end=81 / 16 + 1e-6).frames) == frames

    # the GPU branch (bucket from select_frames' count, then only its frames decoded), DALI's CPU standing in
    select, decode = dali.select_frames, dali.decode_clip_dali
    monkeypatch.setattr(capabilities, "cuda_available", lambda: True)
    monkeypatch.setattr(dali, "select_frames", lambda *a, device, **k: select(*a, device="cpu", **k))
    monkeypatch.setattr(dali, "decode_clip_dali", lambda path, clip, h, w, device, device_id, crop=None:
                        decode(path, clip, h, w, device="cpu", crop=crop))
    gpu = prepare(ManifestEntry("g", path, "grey"), BUCKETS, 16, "dali-gpu")
    check(gpu, frames)
    assert gpu.skip_reason == pyav.skip_reason


def test_the_store_holds_each_clip_in_its_bucket_and_reports_the_short_ones(clips, tmp_path):
    """End to end: run_precompute over the six clips and the renamed PNG; the stored samples are the clips' own
    frames (as many as the bucket, from frame 0), the short clips are reported with the reason."""
    enc = write_tiny_encoders(str(tmp_path / "encoders"))
    manifest = tmp_path / "clips.jsonl"
    rows = [{"id": f"c{n}", "path": clips["mp4", n], "caption": "a grey clip"} for n in LENGTHS]
    rows.append({"id": "png", "path": clips["png"], "caption": "a grey still"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = PrecomputeJob(manifest=str(manifest), out=str(tmp_path / "s.zarr"), vae=enc["vae"],
                        vae_config=enc["vae_config"], text_encoder=enc["text_encoder"],
                        text_config=enc["text_config"], tokenizer=enc["tokenizer"],
                        buckets=[b.name for b in BUCKETS], decode_backend="pyav", decode_workers=1)
    summary = run_precompute(job, progress=False)
    assert summary["store"] == {"1x32x32": 2, "17x32x32": 1, "33x32x32": 1, "81x32x32": 1}
    store = LatentStore.open(job.out)
    for bucket in store.buckets():
        for i in range(store.count(bucket)):
            sample = store.read(bucket, i)
            frames = Bucket.from_name(bucket).frames
            assert list(sample["frame_indices"]) == list(range(frames))
            assert sample["id"] in ("c1", "png") if frames == 1 else sample["id"] == f"c{frames}"
            assert tuple(sample["latents"].shape[1:]) == Bucket.from_name(bucket).latent_shape()
    reasons = {s["id"]: s["reason"] for s in summary["skipped"]}
    assert sorted(reasons) == ["c16", "c9"]
    assert reasons["c9"].startswith("too short for any bucket (9 frames)")
    assert reasons["c16"].startswith("too short for any bucket (16 frames)")
