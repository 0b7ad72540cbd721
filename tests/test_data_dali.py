"""DALI decoding beside PyAV: the same frames (by timestamps, windows, fps resampling, variable frame rate), the
codecs DALI's CPU decoder refuses, the `backend` choice and its fallback, broken files reported with a reason;
the resize + crop inside DALI's pipeline against the CPU path's, and the GPU pipeline's graph (rank's device,
gpu ops), read without a GPU. Only the tests that run NVDEC skip here, for want of CUDA.

Every clip carries its source frame number as the grey level of a flat 16x16 corner patch, so a test can say
which source frame each decoded frame is, whichever decoder produced it."""

import fractions

import numpy as np
import pytest
import torch

from megawan import capabilities
from megawan.data.buckets import Bucket, cover_crop, resize_center_crop
from megawan.data.decoding import DecodeError, UnsupportedCodecError
from megawan.data.manifest import ManifestEntry
from megawan.data.precompute import prepare
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
# DALI's resize against resize_center_crop on the same decoded frames, in uint8 levels: float rounding inside
# the frame (measured <= 0.001), up to ~2 levels on its outer 2 pixels, where DALI and torch end the
# antialiasing filter differently (measured 1.8 on noise halved; 0 on these clips)
INNER_TOL, BORDER_TOL = 0.01, 2.5


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


needs_cuda = pytest.mark.skipif(not capabilities.cuda_available(), reason="needs CUDA (NVDEC, GPU resize)")


@pytest.fixture
def dali():
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the [test] extra installs it on Linux)")
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
        dali._run(str(path), np.array([0], dtype=np.int32), "cpu", None)
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
        pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the [test] extra installs it on Linux)")
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


@needs_cuda
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


def levels(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """Largest |a - b| of two [-1, 1] clips in uint8 levels: (inside the frame, on its outer 2 pixels)."""
    diff = (a.cpu() - b.cpu()).abs() * 127.5
    return float(diff[..., 2:-2, 2:-2].max()), float(diff.max())


@pytest.mark.parametrize("name,fps,height,width", [
    ("vp9", 16, 32, 48),  # 64x96 halved, same aspect
    ("vp9", 16, 64, 32),  # portrait window: width has the slack
    ("vp9", 16, 48, 80),  # 64x96 -> 53x80: an odd slack (5 rows), the window at row 2
    ("vp9", 8, 128, 160),  # up-scaled, height has the slack
    ("vp9_square", 48, 48, 32),  # 30 -> 48 fps: repeated frames
])
def test_dali_resize_is_the_cpu_resize(dali, clips, name, fps, height, width):
    """decode_clip_dali runs the GPU path's graph; here on the CPU, against resize_center_crop of the same frames."""
    clip = dali.select_frames(clips[name], fps=fps, device="cpu")
    ours = dali.decode_clip_dali(clips[name], clip, height, width, device="cpu")
    ref = resize_center_crop(decode_video(clips[name], fps=fps, backend="dali-cpu"), height, width)
    assert ours.shape == ref.shape == (3, len(clip.frames), height, width) and ours.dtype == torch.float32
    assert -1 <= float(ours.min()) and float(ours.max()) <= 1
    inner, border = levels(ours, ref)
    assert inner <= INNER_TOL and border <= BORDER_TOL, (inner, border)
    first_frames = clip._replace(frames=clip.frames[:5])  # a bucket's prefix, as precompute cuts it
    assert torch.equal(dali.decode_clip_dali(clips[name], first_frames, height, width, device="cpu"), ours[:, :5])


def test_a_decoded_size_other_than_the_probed_one_is_refused(dali, clips):
    """The resize is sized from the container's frame size: a decoder giving another size must not be resized
    into a distorted clip."""
    clip = dali.select_frames(clips["vp9"], fps=16, device="cpu")
    with pytest.raises(DecodeError, match=r"DALI decoded 22 frames of 96x64, 22 of 96x66 expected"):
        dali.decode_clip_dali(clips["vp9"], clip._replace(height=66), 32, 48, device="cpu")


def test_window_inputs_place_dali_crop_exactly(dali):
    """DALI puts the window at trunc(float32(pos) * (resized - crop)): that must land on cover_crop's top / left."""
    for source_h in range(16, 400, 7):
        for source_w in range(16, 400, 11):
            for height, width in [(32, 48), (48, 32), (480, 832), (192, 192)]:
                crop = cover_crop(source_h, source_w, height, width)
                inputs = dali.window_inputs(crop)
                assert inputs["size"].tolist() == list(crop.resized)
                assert inputs["crop"].tolist() == [height, width]
                slack = np.asarray(crop.resized, dtype=np.float32) - inputs["crop"]
                placed = np.trunc(inputs["crop_pos"] * slack).astype(int).tolist()
                assert placed == [crop.top, crop.left], (source_h, source_w, height, width)


def graph(outputs) -> list:
    """(operator, device, arguments) of every op behind `outputs`, inputs first, DALI's bookkeeping left out."""
    ops, seen = [], set()

    def visit(node):
        op = node.source
        if op is None or id(op) in seen:
            return
        seen.add(id(op))
        for parent in op.inputs:
            visit(parent)
        lines = str(op.spec).splitlines()
        args = dict(line.strip().split(": ", 1) for line in lines[lines.index("  Arguments:") + 1:] if ": " in line)
        device = args.pop("device")
        args = {k: v for k, v in args.items() if not k.startswith("_") and k != "preserve_name"}
        ops.append((lines[0].removeprefix("OpSpec for ").rstrip(":"), device, args))

    for node in outputs:
        visit(node)
    return ops


def test_gpu_pipeline_is_the_cpu_one_on_the_ranks_device(dali, monkeypatch):
    """Defined, not built (building needs the GPU): the rank's device id, NVDEC ("mixed"), then every frame op on
    the GPU with the arguments of the CPU graph that test_dali_resize_is_the_cpu_resize runs."""
    monkeypatch.setattr(capabilities, "rank_device", lambda: torch.device("cuda", 3))  # LOCAL_RANK 3's GPU
    device_id = dali._device_id("gpu", None)
    assert device_id == 3 and dali._device_id("gpu", 1) == 1 and dali._device_id("cpu", None) is None
    pipe, (clip, shape) = dali.define_pipeline("gpu", device_id, resize=True)
    assert pipe.device_id == 3 and clip.device == "gpu" and shape.device == "cpu"
    gpu = graph([clip, shape])
    devices = {name: device for name, device, _ in gpu}
    assert devices["decoders__Video"] == "mixed" and devices["ExternalSource"] == "cpu"  # argument inputs: host
    assert devices["ResizeCropMirror"] == devices["Transpose"] == devices["_ArithmeticGenericOp"] == "gpu"
    after_decoder = [device for name, device, _ in gpu if name not in ("ExternalSource", "_TensorSubscript")]
    assert after_decoder[0] == "mixed" and set(after_decoder[1:]) == {"gpu", "cpu"}  # cpu: only the _Shape
    assert [d for name, d, _ in gpu if name == "_Shape"] == ["cpu"]
    _, cpu_outputs = dali.define_pipeline("cpu", None, resize=True)
    cpu = graph(cpu_outputs)
    strip = lambda ops: [(name, {k: v for k, v in args.items() if k != "affine"}) for name, _, args in ops]
    assert strip(gpu) == strip(cpu)
    resize = next(args for name, _, args in gpu if name == "ResizeCropMirror")
    assert resize["antialias"] == "True" and resize["rounding"] == "truncate"


def test_prepare_on_gpu_with_dali_cpu_standing_in(dali, clips, monkeypatch):
    """precompute.prepare's GPU branch (frames chosen from the container, bucket, then only its frames decoded and
    resized by DALI) on the rank's device id, with DALI's CPU device standing in for the GPU."""
    buckets = [Bucket(9, 48, 48), Bucket(17, 48, 64), Bucket(1, 32, 32)]  # 64x96 clips -> 48x72, cropped
    entry = ManifestEntry("a", clips["vp9"], "a red circle", start=0.25)
    ref = prepare(entry, buckets, 16, "dali-cpu")  # DALI decodes on the CPU, torch resizes

    asked = []
    select, decode = dali.select_frames, dali.decode_clip_dali
    monkeypatch.setattr(capabilities, "cuda_available", lambda: True)
    monkeypatch.setattr(dali, "select_frames", lambda *a, device, **k: select(*a, device="cpu", **k))

    def decode_on_cpu(path, clip, height, width, device, device_id, crop=None):
        asked.append((device, device_id))
        return decode(path, clip, height, width, device="cpu", crop=crop)

    monkeypatch.setattr(dali, "decode_clip_dali", decode_on_cpu)
    ours = prepare(entry, buckets, 16, "dali-gpu", device_id=5)
    assert asked == [("gpu", 5)] and ours.skip_reason is None
    assert ours.bucket == ref.bucket == Bucket(17, 48, 64)
    assert ours.frame_indices.tolist() == ref.frame_indices.tolist() == list(range(4, 21))
    inner, border = levels(ours.video, ref.video)
    assert inner <= INNER_TOL and border <= BORDER_TOL, (inner, border)

    h264 = ManifestEntry("b", clips["h264"], "a green square")
    assert prepare(h264, buckets, 16, "auto").bucket == Bucket(9, 48, 48)  # NVDEC refused -> PyAV, CPU resize
    skipped = prepare(h264, buckets, 16, "dali-gpu")
    assert "codec h264 is not decodable by DALI on CPU" in skipped.skip_reason and len(asked) == 1
    short = prepare(ManifestEntry("c", clips["vp9"], "0.3 s", end=0.3), buckets, 16, "dali-gpu")
    assert short.skip_reason == "too short for any bucket (5 frames) at 16 fps: the shortest video bucket has 9"
    assert len(asked) == 1


def test_dali_crop_box_is_sliced_before_the_resize(dali, clips, monkeypatch):
    """A manifest row's `crop` (a letterbox's picture): sliced from the decoded frames inside the pipeline, on the
    decoder's device (here the CPU graph, which the GPU one mirrors), before the resize; the same as slicing the
    decoded frames and resizing them with torch. precompute's GPU branch picks the bucket from the box's size."""
    box = (8, 6, 64, 48)  # x, y, w, h inside the 96x64 frame, off-centre: anchor order matters
    clip = dali.select_frames(clips["vp9"], fps=16, device="cpu")
    ours = dali.decode_clip_dali(clips["vp9"], clip, 32, 48, device="cpu", crop=box)
    frames = decode_video(clips["vp9"], fps=16, backend="dali-cpu")[:, 6:54, 8:72]
    inner, border = levels(ours, resize_center_crop(frames, 32, 48))
    assert inner <= INNER_TOL and border <= BORDER_TOL, (inner, border)
    with pytest.raises(DecodeError, match=r"crop \[40, 6, 64, 48\] reaches past the 96x64 frame"):
        dali.decode_clip_dali(clips["vp9"], clip, 32, 48, device="cpu", crop=(40, 6, 64, 48))
    _, (cropping, _) = dali.define_pipeline("gpu", 0, resize=True, box=True)
    devices = {name: device for name, device, _ in graph([cropping])}
    assert devices["Slice"] == devices["ResizeCropMirror"] == "gpu"

    buckets = [Bucket(17, 48, 64), Bucket(17, 32, 64)]  # the 96x64 frame's aspect, the 96x48 box's
    entry = ManifestEntry("a", clips["vp9"], "a red circle", crop=(0, 8, 96, 48))
    ref = prepare(entry, buckets, 16, "dali-cpu")  # DALI decodes on the CPU, crop_frames + torch resize
    select, decode = dali.select_frames, dali.decode_clip_dali
    monkeypatch.setattr(capabilities, "cuda_available", lambda: True)
    monkeypatch.setattr(dali, "select_frames", lambda *a, device, **k: select(*a, device="cpu", **k))
    monkeypatch.setattr(dali, "decode_clip_dali", lambda *a, device, device_id, crop: decode(*a, device="cpu",
                                                                                             crop=crop))
    ours = prepare(entry, buckets, 16, "dali-gpu")
    assert ours.bucket == ref.bucket == Bucket(17, 32, 64)
    assert prepare(ManifestEntry("b", clips["vp9"], "bars"), buckets, 16, "dali-gpu").bucket == Bucket(17, 48, 64)
    inner, border = levels(ours.video, ref.video)
    assert inner <= INNER_TOL and border <= BORDER_TOL, (inner, border)


@needs_cuda
@pytest.mark.parametrize("name", ["vp9", "h264"])
def test_dali_gpu_clip_on_the_ranks_device(dali, clips, name):
    """Not run where this was written (no GPU). NVDEC's frames resized on the GPU against the same frames resized
    by torch: only the resize differs, so the CPU comparison's tolerances hold."""
    device = capabilities.rank_device()
    clip = dali.select_frames(clips[name], fps=16, device="gpu")
    ours = dali.decode_clip_dali(clips[name], clip, 48, 32, device="gpu")
    assert ours.is_cuda and ours.device == device and ours.dtype == torch.float32 and ours.shape == (3, 17, 48, 32)
    frames = dali.decode_video_dali(clips[name], fps=16, device="gpu")
    inner, border = levels(ours, resize_center_crop(frames, 48, 32))
    assert inner <= INNER_TOL and border <= BORDER_TOL, (inner, border)
