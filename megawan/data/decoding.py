"""What the PyAV decoder (`megawan.data.video`) and the DALI decoder (`megawan.data.dali`) share, so that they
fail alike and pick the same frames: the errors a file raises, the rule that picks a clip's frames from the
frames' timestamps, and opening a file with PyAV (DALI's path probes the container with PyAV's demuxer).
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


def sample_times(first: float, last_end: float, fps: float, num_frames: Optional[int]) -> np.ndarray:
    """Times t0 + k / fps inside [first, last_end)."""
    # every k with t0 + k / fps < last_end; a tenth of a frame of slack for timestamps rounded by the container
    count = int(np.ceil((last_end - first) * fps - 0.1))
    if num_frames is not None:
        count = min(count, num_frames)
    return first + np.arange(max(count, 0)) / fps


def available_frames(times: np.ndarray, fps: float, start: Optional[float] = None,
                     end: Optional[float] = None) -> np.ndarray:
    """The sampling times of the clip the frames shown at `times` (ascending, seconds, already cut to the window)
    really hold at `fps`: first + k / fps (first: `start`, else the first frame's time) while before the clip's
    end, which is the last frame's time plus the median frame step, or `end` where that comes earlier.

    `end` only cuts: a window reaching past the last frame never adds samples, so no clip is ever lengthened
    with copies of its last frame. Its length is what a clip's bucket is chosen by (`buckets.assign_bucket`),
    by the PyAV and DALI paths alike, before any frame is decoded on DALI's.
    """
    times = np.asarray(times, dtype=np.float64)
    step = np.median(np.diff(times)) if len(times) > 1 else 1.0 / fps
    first = start if start is not None else times[0]
    last_end = times[-1] + step
    if end is not None:
        last_end = min(last_end, end)
    return sample_times(first, last_end, fps, None)


def frame_indices(path: str, times: np.ndarray, fps: float, num_frames: Optional[int], start: Optional[float],
                  end: Optional[float]) -> np.ndarray:
    """Which of the frames shown at `times` (ascending, seconds, already cut to the window) make the clip: one per
    sampling time of `available_frames` (the first `num_frames` of them), each the last frame shown at or before
    its time. Works for variable frame rates: only the timestamps count. Shared by the PyAV and DALI paths so they
    pick alike. A clip with fewer than `num_frames` frames raises DecodeError ("too short"), never pads.
    """
    times = np.asarray(times, dtype=np.float64)
    wanted = available_frames(times, fps, start, end)
    if num_frames is not None and len(wanted) < num_frames:
        raise DecodeError(path, f"too short: {len(wanted)} frames at {fps:g} fps, {num_frames} needed")
    if len(wanted) == 0:
        raise DecodeError(path, "no frames at the requested rate")
    wanted = wanted[:num_frames]
    step = np.median(np.diff(times)) if len(times) > 1 else 1.0 / fps
    # for each sampling time, the last frame shown at or before it. Containers round timestamps (webm: to 1 ms),
    # so a frame stamped up to 2 ms after a sampling time counts as shown at it; a quarter frame step at most.
    slack = min(2e-3, 0.25 * step) if step > 0 else 2e-3
    return np.clip(np.searchsorted(times, wanted + slack, side="right") - 1, 0, len(times) - 1)


def open_video(path: str):
    """(container, first video stream) with PyAV, or DecodeError for a missing / empty / unreadable / audio-only file.
    The caller closes the container."""
    import av

    if os.path.isdir(path):
        raise DecodeError(path, "is a directory, not a video file")
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


def decode_first_frame(container, stream, path: str):
    """The first decodable frame of `stream` (an open PyAV container's), or DecodeError naming what is wrong."""
    import av

    try:
        first = next(container.decode(stream), None)
    except av.FFmpegError as e:
        raise DecodeError(path, f"corrupt video stream ({type(e).__name__}: {e})") from None
    if first is None:
        raise DecodeError(path, "no decodable frames")
    return first


def check_crop(crop: Optional[tuple], height: int, width: int, path: str) -> tuple:
    """(height, width) of the frames after a manifest row's `crop` (x, y, w, h): the box's size, or the frame's
    without one. DecodeError when the box reaches past the height x width frame (a crop measured on another file)."""
    if crop is None:
        return height, width
    x, y, w, h = crop
    if x + w > width or y + h > height:
        raise DecodeError(path, f"crop [{x}, {y}, {w}, {h}] reaches past the {width}x{height} frame")
    return h, w


def crop_frames(frames: np.ndarray, crop: Optional[tuple], path: str) -> np.ndarray:
    """uint8 [T, H, W, 3] cut to the row's `crop` box (a view; the frames themselves without one)."""
    if crop is None:
        return frames
    check_crop(crop, frames.shape[1], frames.shape[2], path)
    x, y, w, h = crop
    return frames[:, y:y + h, x:x + w]
