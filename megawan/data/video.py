"""Decoding videos and images to uint8 frames [T, H, W, 3], sampled at a target frame rate.

Two decoders behind one call (`backend`):
- PyAV (FFmpeg) on the CPU: every codec FFmpeg reads; the reference path.
- NVIDIA DALI (`megawan.data.dali`): `fn.decoders.video` on the GPU (NVDEC: H.264, HEVC, AV1, VP8/9, MJPEG,
  MPEG-4) or on the CPU (VP8, VP9 and MJPEG only). Both pick frames by the same timestamps, so they return the
  same frames up to colour conversion (chroma up-sampling differs; see tests/test_data_dali.py).
`auto` takes DALI on the GPU where CUDA and DALI are there (falling back to PyAV for a codec DALI refuses), else
PyAV. A file that cannot give the requested clip raises `DecodeError` with the reason, which the precompute job
records and skips (corrupt, truncated, empty, audio-only, too short, …).

    frames = decode_video("clip.mp4", fps=16, num_frames=81)            # the first 81 frames at 16 fps
    frames = decode_video("long.mp4", fps=16, start=12.0, end=17.0)     # a 5 s window
    frames = decode_video("clip.webm", fps=16, backend="dali-cpu")      # DALI on the CPU (VP8 / VP9 / MJPEG)
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np


class DecodeError(Exception):
    """A file that does not give the requested frames; `reason` says why, for the skipped-files report."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class UnsupportedCodecError(DecodeError):
    """The file may be fine, but this decoder cannot read it: its codec (DALI on CPU and H.264), or for DALI a
    container whose packets carry no timestamps. `decode_video(backend="auto")` then falls back to PyAV."""

    def __init__(self, path: str, codec: str, reason: str):
        super().__init__(path, reason)
        self.codec = codec


BACKENDS = ("auto", "pyav", "dali-cpu", "dali-gpu")


def sample_times(first: float, last_end: float, fps: float, num_frames: Optional[int]) -> np.ndarray:
    """Times t0 + k / fps inside [first, last_end)."""
    # every k with t0 + k / fps < last_end; a tenth of a frame of slack for timestamps rounded by the container
    count = int(np.ceil((last_end - first) * fps - 0.1))
    if num_frames is not None:
        count = min(count, num_frames)
    return first + np.arange(max(count, 0)) / fps


def frame_indices(path: str, times: np.ndarray, fps: float, num_frames: Optional[int], start: Optional[float],
                  end: Optional[float]) -> np.ndarray:
    """Which of the frames shown at `times` (ascending, seconds, already cut to the window) make the clip.

    The clip's frames are at first + k / fps (first: `start`, else the first frame's time), up to `end` (else the
    last frame's time plus the median frame step); each is the last frame shown at or before its time. Works for
    variable frame rates: only the timestamps count. Shared by the PyAV and DALI paths so they pick alike.
    """
    times = np.asarray(times, dtype=np.float64)
    step = np.median(np.diff(times)) if len(times) > 1 else 1.0 / fps
    first = start if start is not None else times[0]
    last_end = end if end is not None else times[-1] + step
    wanted = sample_times(first, last_end, fps, num_frames)
    if num_frames is not None and len(wanted) < num_frames:
        raise DecodeError(path, f"too short: {len(wanted)} frames at {fps:g} fps, {num_frames} needed")
    if len(wanted) == 0:
        raise DecodeError(path, "no frames at the requested rate")
    # for each sampling time, the last frame shown at or before it. Containers round timestamps (webm: to 1 ms),
    # so a frame stamped up to 2 ms after a sampling time counts as shown at it; a quarter frame step at most.
    slack = min(2e-3, 0.25 * step) if step > 0 else 2e-3
    return np.clip(np.searchsorted(times, wanted + slack, side="right") - 1, 0, len(times) - 1)


def open_video(path: str):
    """(container, first video stream) with PyAV, or DecodeError for a missing / empty / unreadable / audio-only file.
    The caller closes the container."""
    import av

    if not os.path.isfile(path):
        raise DecodeError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise DecodeError(path, "empty file")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise DecodeError(path, f"not a readable media file ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
        container.close()
        raise DecodeError(path, f"no video stream (contains {kinds})")
    return container, container.streams.video[0]


def decode_video(path: str, fps: float = 16.0, num_frames: Optional[int] = None, start: Optional[float] = None,
                 end: Optional[float] = None, backend: str = "auto") -> np.ndarray:
    """uint8 frames [T, H, W, 3] at `fps` (see the module docstring); `backend`: auto | pyav | dali-cpu | dali-gpu."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r} ({' | '.join(BACKENDS)})")
    if backend == "pyav":
        return decode_video_pyav(path, fps, num_frames, start, end)
    # looked up at call time (not imported at module level): megawan imports without DALI, and tests can
    # stand in for the capability check
    from megawan import capabilities
    from megawan.data import dali

    if backend == "dali-cpu":
        return dali.decode_video_dali(path, fps, num_frames, start, end, device="cpu")
    if backend == "dali-gpu":
        return dali.decode_video_dali(path, fps, num_frames, start, end, device="gpu")
    if capabilities.cuda_available() and dali.dali_available():
        try:
            return dali.decode_video_dali(path, fps, num_frames, start, end, device="gpu")
        except UnsupportedCodecError:
            pass  # a codec NVDEC does not take (e.g. ProRes): FFmpeg reads it on the CPU
    return decode_video_pyav(path, fps, num_frames, start, end)


def decode_video_pyav(path: str, fps: float = 16.0, num_frames: Optional[int] = None, start: Optional[float] = None,
                      end: Optional[float] = None) -> np.ndarray:
    import av

    container, stream = open_video(path)
    with container:
        stream.thread_type = "AUTO"
        if start:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        times, frames = [], []
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else (times[-1] + 1 / fps if times else 0.0)
                if start is not None and t < start - 1e-6:
                    continue
                if end is not None and t >= end:
                    break
                times.append(t)
                frames.append(frame.to_ndarray(format="rgb24"))
                if num_frames is not None and end is None and (t - times[0]) * fps >= num_frames:
                    break  # enough decoded for the requested clip
        except av.FFmpegError as e:
            if not frames:
                raise DecodeError(path, f"corrupt video stream ({type(e).__name__}: {e})") from None
        if not frames:
            raise DecodeError(path, "no decodable frames in the requested window")
    index = frame_indices(path, np.asarray(times), fps, num_frames, start, end)
    return np.stack([frames[i] for i in index])


def decode_image(path: str) -> np.ndarray:
    """An image as one frame [1, H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError) as e:
        raise DecodeError(path, f"not a readable image ({e})") from None
