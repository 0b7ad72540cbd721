"""Decoding videos and images to uint8 frames [T, H, W, 3], sampled at a target frame rate.

CPU path: PyAV (FFmpeg). A file that cannot give the requested clip raises `DecodeError` with the reason,
which the precompute job records and skips (corrupt, truncated, empty, audio-only, too short, …).
NVIDIA DALI's GPU decoder is the fast path on GPU machines (to come, behind megawan.capabilities).

    frames = decode_video("clip.mp4", fps=16, num_frames=81)            # the first 81 frames at 16 fps
    frames = decode_video("long.mp4", fps=16, start=12.0, end=17.0)     # a 5 s window
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


def sample_times(first: float, last_end: float, fps: float, num_frames: Optional[int]) -> np.ndarray:
    """Times t0 + k / fps inside [first, last_end)."""
    count = int(np.ceil((last_end - first) * fps - 1e-6))  # every k with t0 + k / fps < last_end
    if num_frames is not None:
        count = min(count, num_frames)
    return first + np.arange(max(count, 0)) / fps


def decode_video(path: str, fps: float = 16.0, num_frames: Optional[int] = None, start: Optional[float] = None,
                 end: Optional[float] = None) -> np.ndarray:
    import av

    if not os.path.isfile(path):
        raise DecodeError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise DecodeError(path, "empty file")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise DecodeError(path, f"not a readable media file ({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            raise DecodeError(path, f"no video stream (contains {kinds})")
        stream = container.streams.video[0]
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
    times = np.asarray(times)
    step = np.median(np.diff(times)) if len(times) > 1 else 1.0 / fps
    first = start if start is not None else times[0]
    last_end = end if end is not None else times[-1] + step
    wanted = sample_times(first, last_end, fps, num_frames)
    if num_frames is not None and len(wanted) < num_frames:
        raise DecodeError(path, f"too short: {len(wanted)} frames at {fps:g} fps, {num_frames} needed")
    if len(wanted) == 0:
        raise DecodeError(path, "no frames at the requested rate")
    # for each sampling time, the last frame shown at or before it
    index = np.clip(np.searchsorted(times, wanted + 1e-6, side="right") - 1, 0, len(frames) - 1)
    return np.stack([frames[i] for i in index])


def decode_image(path: str) -> np.ndarray:
    """An image as one frame [1, H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError) as e:
        raise DecodeError(path, f"not a readable image ({e})") from None
