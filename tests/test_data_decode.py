"""Manifests, synthetic videos and PyAV decoding: frames sampled at the target rate, windows, images, and
broken files reported with a reason instead of crashing."""

import json

import numpy as np
import pytest

from megawan.data.decoding import DecodeError
from megawan.data.manifest import ManifestError, read_manifest
from megawan.data.video import decode_image, decode_video
from megawan.demo.shapes import COLORS, ShapeClip, render, write_synthetic_dataset
from megawan.utils.media import write_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return write_synthetic_dataset(str(folder), count=4, frames=17, height=32, width=48, broken=4)


def test_synthetic_manifest_and_decode(dataset):
    entries = read_manifest(dataset)
    assert len(entries) == 8 and entries[0].id == "clip_00000"
    good = [e for e in entries if e.id.startswith("clip")]
    for entry in good:
        frames = decode_video(entry.path, fps=16)
        assert frames.shape == (17, 32, 48, 3) and frames.dtype == np.uint8
        color = entry.caption.split()[1]
        # the shape's colour is the brightest content of the first frame (H.264 is lossy: nearest palette colour)
        pixel = frames[0].reshape(-1, 3)[frames[0].reshape(-1, 3).astype(int).sum(1).argmax()]
        nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - pixel).sum())
        assert nearest == color


def test_sampling_rate_and_windows(tmp_path):
    clip = ShapeClip("red", "square", "right")
    frames = render(clip, 33, 32, 32)
    path = str(tmp_path / "c.mp4")
    write_video(path, frames, fps=16)
    assert decode_video(path, fps=16).shape[0] == 33
    half = decode_video(path, fps=8)  # every other frame
    assert half.shape[0] == 17
    full = decode_video(path, fps=16)
    assert np.abs(half.astype(int) - full[::2].astype(int)).max() == 0
    assert decode_video(path, fps=16, num_frames=9).shape[0] == 9
    window = decode_video(path, fps=16, start=1.0, end=1.5)  # frames 16..23
    assert window.shape[0] == 8
    assert np.abs(window.astype(int) - full[16:24].astype(int)).max() == 0
    with pytest.raises(DecodeError, match="too short"):
        decode_video(path, fps=16, num_frames=81)


@pytest.mark.reliability
def test_broken_files_are_reported_with_a_reason(dataset):
    reasons = {}
    for entry in read_manifest(dataset):
        if entry.id.startswith("broken"):
            with pytest.raises(DecodeError) as err:
                decode_video(entry.path, fps=16)
            reasons[entry.caption] = err.value.reason
    assert "empty" in reasons["broken file (empty)"]
    assert "no video stream" in reasons["broken file (audio_only)"]
    assert reasons["broken file (garbage)"] and reasons["broken file (truncated)"]


def test_images_are_one_frame(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(tmp_path / "i.png")
    assert decode_image(str(tmp_path / "i.png")).shape == (1, 20, 30, 3)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(str(tmp_path / "bad.png"))


@pytest.mark.parametrize("content,message", [
    ('{"path": "a.mp4"}\n', r"row 1, field 'caption'"),
    ('{"path": "a.mp4", "caption": "x", "fps": "fast"}\n', r"row 1, field 'fps': 'fast' is not a number"),
    ('{"path": "a.mp4", "caption": "x"}\n{"path": "a.mp4", "caption": "y"}\n', r"row 2, field 'id'.*repeats row 1"),
    ('{"path": "a.mp4", "caption": "x", "start": 3, "end": 2}\n', r"row 1, field 'end'"),
    ('not json\n', r"row 1 is not valid JSON"),
    ('{"path": "a.mp4", "caption": "x", "colour": "red"}\n', r"unknown field"),
])
def test_malformed_manifests_name_row_and_field(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(path))


def test_csv_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption,start,end\nv.mp4,a red ball,1.5,6.5\nimg.png,a cat,,\n")
    entries = read_manifest(str(tmp_path / "m.csv"))
    assert entries[0].start == 1.5 and entries[0].end == 6.5 and entries[0].id == "v@1.5"
    assert entries[1].is_image and entries[1].path == str(tmp_path / "img.png")
    json.dumps([e.__dict__ for e in entries])


@pytest.mark.parametrize("codec,ext,fps", [("libvpx-vp9", "webm", 16), ("libvpx-vp9", "webm", 24), ("libx264", "mp4", 16)])
def test_same_rate_decoding_keeps_every_frame_despite_rounded_timestamps(tmp_path, codec, ext, fps):
    """webm stores timestamps in whole milliseconds (62 ms for a 62.5 ms frame): still every frame, once."""
    frames = np.zeros((16, 32, 32, 3), np.uint8)
    for i in range(16):
        frames[i] = i * 15
    path = str(tmp_path / f"ramp.{ext}")
    write_video(path, frames, fps, codec)
    out = decode_video(path, fps=fps)
    assert [int(round(f.mean() / 15)) for f in out] == list(range(16))


def test_write_video_encodes_reproducibly(tmp_path):
    """The demo's and the tests' clips are data: the same frames must encode to the same file in every process.
    With x264's macroblock-tree rate control on, processes encoding at the same time got different bytes (and
    different decoded pixels) for identical frames (8 processes side by side: 5 to 8 different results; with it
    off, 16 of 16 the same), so write_video turns it off: x264 records its options in the stream itself."""
    frames = render(ShapeClip("red", "circle", "left"), 17, 32, 32, seed=3)
    paths = [str(tmp_path / f"clip{k}.mp4") for k in range(2)]
    for path in paths:
        write_video(path, frames)
    data = [open(p, "rb").read() for p in paths]
    assert data[0] == data[1]
    options = data[0][data[0].index(b"options: "):].split(b"\x00")[0].decode()  # x264's SEI: "... mbtree=0 ..."
    assert " mbtree=0 " in options, options
