"""DALI decoding beside PyAV: the same frames (by timestamps, windows, fps resampling, variable frame rate), the
codecs DALI's CPU decoder refuses, the `backend` choice and its fallback, broken files reported with a reason.

Every clip carries its source frame number as the grey level of a flat 16x16 corner patch, so a test can say
which source frame each decoded frame is, whichever decoder produced it."""

import fractions

import numpy as np
import pytest

from megawan.data.decoding import DecodeError, UnsupportedCodecError
from megawan.data.video import decode_video
from megawan.demo.shapes import BROKEN_KINDS, ShapeClip, render, write_broken
from megawan.utils.media import write_video

LEVEL0, LEVEL_STEP = 16, 6  # patch grey level of source frame k: 16 + 6 k (k < 33 stays below 255)

# PyAV vs DALI CPU on the VP9 clips below, in uint8 levels over all pixels and channels, as measured (PyAV 18.1,
# libavcodec 62, libvpx-vp9; DALI 2.4.0): mean |diff| 0.67-0.72, 99th percentile 10-11, max 33-44 (the VFR clip:
# mean 0.80, max 43). Both convert yuv420p to RGB with swscale but up-sample chroma differently (DALI asks for
# SWS_BILINEAR), so flat areas agree within a level or two and only the coloured shapes' edges differ by tens of
# levels. The frames chosen are identical (checked exactly through the corner patch). Thresholds a little above:
MEAN_ABS_TOL, P99_ABS_TOL, MAX_ABS_TOL = 1.0, 14, 50


def stamped(clip: ShapeClip, frames: int, height: int, width: int) -> np.ndarray:
    video = render(clip, frames, height, width)
    for k in range(frames):
        video[k, :16, :16] = LEVEL0 + LEVEL_STEP * k
    return video


def source_index(frames) -> list:
    """The source frame number of each decoded frame, read from its corner patch."""
    frames = np.asarray(frames)
    level = frames[:, 2:14, 2:14].astype(np.float64).mean(axis=(1, 2, 3))  # inside the patch, off its edges
    return np.round((level - LEVEL0) / LEVEL_STEP).astype(int).tolist()


def write_vfr(path: str, frames: np.ndarray, times, codec: str) -> None:
    """A variable-frame-rate file: frame k shown from times[k] s (a 1 ms time base; mp4 rescales it)."""
    import av

    time_base = fractions.Fraction(1, 1000)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        for frame, t in zip(frames, times):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = int(round(t * 1000)), time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def expected(times, fps: float, count: int) -> list:
    """The last source frame shown at or before each sampling time k / fps."""
    return (np.searchsorted(np.asarray(times), np.arange(count) / fps + 1e-6, side="right") - 1).tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dali")
    paths = {
        "vp9": str(folder / "c24.webm"),  # 33 frames at 24 fps
        "vp9_square": str(folder / "c30.webm"),  # 33 frames at 30 fps, 64x64
        "h264": str(folder / "c.mp4"),
    }
    write_video(paths["vp9"], stamped(ShapeClip("red", "circle", "right"), 33, 64, 96), fps=24, codec="libvpx-vp9")
    write_video(paths["vp9_square"], stamped(ShapeClip("blue", "triangle", "down"), 33, 64, 64), fps=30,
                codec="libvpx-vp9")
    write_video(paths["h264"], stamped(ShapeClip("green", "square", "up"), 17, 64, 64), fps=16)
    return paths


@pytest.fixture
def dali():
    pytest.importorskip("nvidia.dali")
    from megawan.data import dali

    return dali


@pytest.mark.parametrize("name,kwargs,source_fps", [
    ("vp9", dict(fps=16), 24),  # 24 -> 16 fps: source frames 0, 1, 3, 4, 6, ...
    ("vp9", dict(fps=16, start=0.5, end=1.0), 24),  # a window: 8 frames from source frame 12
    ("vp9", dict(fps=16, num_frames=9), 24),
    ("vp9", dict(fps=8, start=0.25), 24),
    ("vp9_square", dict(fps=16), 30),
    ("vp9_square", dict(fps=16, start=0.3, end=0.8), 30),
])
def test_dali_cpu_matches_pyav_on_vp9(dali, clips, name, kwargs, source_fps):
    path = clips[name]
    ours = decode_video(path, backend="dali-cpu", **kwargs)
    ref = decode_video(path, backend="pyav", **kwargs)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    # the same source frames, and the ones the sampling rule asks for
    first = kwargs.get("start") or 0.0
    times = np.arange(33) / source_fps
    want = (np.searchsorted(times, first + np.arange(len(ref)) / kwargs["fps"] + 1e-6, side="right") - 1).tolist()
    assert source_index(ours) == source_index(ref) == want
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < MEAN_ABS_TOL, diff.mean()
    assert np.percentile(diff, 99) <= P99_ABS_TOL, np.percentile(diff, 99)
    assert diff.max() <= MAX_ABS_TOL, diff.max()


def test_sampling_counts(dali, clips):
    assert decode_video(clips["vp9"], fps=16, backend="dali-cpu").shape == (22, 64, 96, 3)  # 33 / 24 s at 16 fps
    assert decode_video(clips["vp9"], fps=16, start=0.5, end=1.0, backend="dali-cpu").shape[0] == 8
    with pytest.raises(DecodeError, match=r"too short: 22 frames at 16 fps, 81 needed"):
        decode_video(clips["vp9"], fps=16, num_frames=81, backend="dali-cpu")
    with pytest.raises(DecodeError, match="no decodable frames in the requested window"):
        decode_video(clips["vp9"], fps=16, start=5.0, backend="dali-cpu")


def test_dali_cpu_refuses_h264_and_auto_decodes_it(dali, clips):
    with pytest.raises(DecodeError, match=r"codec h264 is not decodable by DALI on CPU") as err:
        decode_video(clips["h264"], fps=16, backend="dali-cpu")
    assert isinstance(err.value, UnsupportedCodecError) and err.value.codec == "h264"
    frames = decode_video(clips["h264"], fps=16)  # auto: PyAV on a CPU machine, DALI's NVDEC on a GPU one
    assert frames.shape == (17, 64, 64, 3) and source_index(frames) == list(range(17))


def test_auto_falls_back_to_pyav_when_dali_refuses_the_codec(dali, clips, monkeypatch):
    """What `auto` does on a GPU machine, with DALI's CPU decoder standing in for the GPU one."""
    from megawan import capabilities

    calls, decode_cpu = [], dali.decode_video_dali

    def dali_on_cpu(path, *args, device="gpu", **kwargs):
        calls.append(device)
        return decode_cpu(path, *args, device="cpu", **kwargs)

    monkeypatch.setattr(capabilities, "cuda_available", lambda: True)
    monkeypatch.setattr(dali, "decode_video_dali", dali_on_cpu)
    h264 = decode_video(clips["h264"], fps=16)  # refused by DALI -> PyAV
    assert calls == ["gpu"] and np.array_equal(h264, decode_video(clips["h264"], fps=16, backend="pyav"))
    vp9 = decode_video(clips["vp9"], fps=16)  # taken by DALI
    assert calls == ["gpu", "gpu"] and np.array_equal(vp9, decode_cpu(clips["vp9"], fps=16))
    with pytest.raises(DecodeError, match="too short"):  # a file problem is not a reason to try PyAV
        decode_video(clips["vp9"], fps=16, num_frames=81)


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_files_with_dali(dali, clips, tmp_path, kind):
    path = str(tmp_path / ("broken.m4a" if kind == "audio_only" else "broken.mp4"))
    write_broken(path, kind, good_video=clips["h264"])
    with pytest.raises(DecodeError) as ours:
        decode_video(path, backend="dali-cpu")
    with pytest.raises(DecodeError) as ref:
        decode_video(path, backend="pyav")
    assert ours.value.reason == ref.value.reason  # both read the container with FFmpeg first
    reason = {"empty": "empty file", "audio_only": "no video stream"}.get(kind, "not a readable media file")
    assert reason in ours.value.reason


def test_truncated_webm_gives_the_same_partial_clip(dali, clips, tmp_path):
    data = open(clips["vp9"], "rb").read()
    path = str(tmp_path / "cut.webm")
    open(path, "wb").write(data[: len(data) * 2 // 3])
    ours, ref = decode_video(path, fps=16, backend="dali-cpu"), decode_video(path, fps=16, backend="pyav")
    assert 0 < len(ours) < 22 and source_index(ours) == source_index(ref)


def test_dali_errors_become_decode_errors(dali, clips, tmp_path):
    """A file DALI itself cannot open (the container check skipped) is a DecodeError, and the next file decodes."""
    path = tmp_path / "garbage.webm"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError, match=r"DALI: Failed to create video decoder"):
        dali._run(str(path), np.array([0], dtype=np.int32), "cpu", 0, "numpy")
    assert decode_video(clips["vp9"], fps=16, backend="dali-cpu").shape == (22, 64, 96, 3)  # pipeline rebuilt


@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_variable_frame_rate_by_timestamps(tmp_path, codec, ext):
    """Frames shown for 20, 50 or 130 ms in random order: the clip follows the timestamps, not the frame count
    (H.264 in mp4 also reorders B-frames; VP9 is checked with DALI too)."""
    import av

    rng = np.random.default_rng(0)
    times = np.concatenate([[0.0], np.cumsum(rng.choice([0.02, 0.05, 0.13], size=19))])
    path = str(tmp_path / f"vfr.{ext}")
    write_vfr(path, stamped(ShapeClip("cyan", "circle", "left"), 20, 64, 64), times, codec)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stamps = np.sort([p.pts for p in container.demux(stream) if p.size]) * float(stream.time_base)
    assert np.allclose(stamps, times, atol=1e-3) and len(set(np.round(np.diff(stamps), 3))) == 3  # really VFR
    frames = decode_video(path, fps=16, backend="pyav")
    # 1.17 s of frames plus a median step of 50 ms -> 20 frames at 16 fps
    assert source_index(frames) == expected(times, 16, 20)
    assert source_index(decode_video(path, fps=16, start=0.25, end=0.75, backend="pyav")) == \
        (np.searchsorted(times, 0.25 + np.arange(8) / 16 + 1e-6, side="right") - 1).tolist()
    if ext == "webm":
        pytest.importorskip("nvidia.dali")
        ours = decode_video(path, fps=16, backend="dali-cpu")
        assert source_index(ours) == expected(times, 16, 20)
        diff = np.abs(ours.astype(np.int16) - frames.astype(np.int16))
        assert diff.mean() < MEAN_ABS_TOL and diff.max() <= MAX_ABS_TOL


def test_backend_argument(clips):
    with pytest.raises(ValueError, match="unknown decode backend"):
        decode_video(clips["vp9"], backend="ffmpeg")
    from megawan import capabilities

    if not capabilities.cuda_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            decode_video(clips["vp9"], backend="dali-gpu")


@pytest.mark.skipif("not __import__('megawan.capabilities').capabilities.cuda_available()", reason="needs CUDA")
@pytest.mark.parametrize("name", ["vp9", "h264"])
def test_dali_gpu_matches_pyav(dali, clips, name):
    """NVDEC ("mixed"). Not run where this was written (no GPU): frame choice is exact; the colour tolerance is a
    guess, looser than the CPU one, since NVDEC converts colour in its own kernel."""
    import torch

    ref = decode_video(clips[name], fps=16, backend="pyav")
    ours = decode_video(clips[name], fps=16, backend="dali-gpu")
    assert ours.shape == ref.shape and source_index(ours) == source_index(ref)
    assert np.abs(ours.astype(np.int16) - ref.astype(np.int16)).mean() < 3.0
    on_gpu = dali.decode_video_dali(clips[name], fps=16, device="gpu", output="torch")
    assert on_gpu.is_cuda and on_gpu.dtype == torch.uint8 and np.array_equal(on_gpu.cpu().numpy(), ours)
