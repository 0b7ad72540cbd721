"""Decoding videos and images to uint8 frames [T, H, W, 3], sampled at a target frame rate.

Two decoders behind one call (`backend`):
- PyAV (FFmpeg) on the CPU: every codec FFmpeg reads; the reference path.
- NVIDIA DALI (`megawan.data.dali`): `fn.decoders.video` on the GPU (NVDEC: H.264, HEVC, AV1, VP8/9, MJPEG,
  MPEG-4) or on the CPU (VP8, VP9 and MJPEG only). Both pick frames by the same timestamps, so they return the
  same frames up to colour conversion (chroma up-sampling differs; see tests/test_data_dali.py).
`auto` takes DALI on the GPU where CUDA and DALI are there (falling back to PyAV for a codec DALI refuses), else
PyAV. A file that cannot give the requested clip raises `DecodeError` (`megawan.data.decoding`, shared by both
decoders) with the reason, which the precompute job records and skips (corrupt, truncated, empty, audio-only,
too short, …).

    frames = decode_video("clip.mp4", fps=16, num_frames=81)            # the first 81 frames at 16 fps
    frames = decode_video("long.mp4", fps=16, start=12.0, end=17.0)     # a 5 s window
    frames = decode_video("clip.webm", fps=16, backend="dali-cpu")      # DALI on the CPU (VP8 / VP9 / MJPEG)
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from megawan import capabilities
from megawan.data import dali
from megawan.data.decoding import DecodeError, UnsupportedCodecError, frame_indices, open_video

BACKENDS = ("auto", "pyav", "dali-cpu", "dali-gpu")


def decode_video(path: str, fps: float = 16.0, num_frames: Optional[int] = None, start: Optional[float] = None,
                 end: Optional[float] = None, backend: str = "auto") -> np.ndarray:
    """uint8 frames [T, H, W, 3] at `fps` (see the module docstring); `backend`: auto | pyav | dali-cpu | dali-gpu."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r} ({' | '.join(BACKENDS)})")
    if backend == "pyav":
        return decode_video_pyav(path, fps, num_frames, start, end)
    # module attributes looked up at call time, so tests can stand in for the capability check and the decoder
    # (dali.py imports DALI itself only when it decodes: megawan imports without it)
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

    if os.path.isdir(path):
        raise DecodeError(path, "is a directory, not an image file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError) as e:
        raise DecodeError(path, f"not a readable image ({e})") from None
