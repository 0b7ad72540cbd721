"""One pass of PyAV over a clip: every frame small (handed to the scene detector as decoded; a few consecutive
pairs kept for optical flow), a few key frames at full size (for borders, exposure, blur and hashes).

    clip = read_clip("a.mp4", side=256, key_frames=3, pairs=8, on_frame=scenes.add)   # start= / end=: a window
    clip.pairs      # [(frame, next frame)] uint8 [h, w, 3], the longer side at most `side`
    clip.times      # [T] seconds from the file's start, every frame
    clip.keys       # uint8 [K, H, W, 3] at the source size, at clip.key_times
    clip.probe      # {"container", "codec", "duration_s", "fps", "width", "height", "rotation", "has_audio",
                    #  "audio_codec"}: the file as its container declares it, read in the same open

A file that gives no clip raises ClipError with the report's reason: `no_video` (audio only), `zero_length` (an
empty file, or a stream without one decodable frame) or `undecodable` (anything FFmpeg cannot read).
Key frames are chosen by time, from the stream's declared duration (or frame count), so two copies of one clip,
re-encoded or rescaled, give the same key frames (the duplicates pass compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megawan.data.decoding import DecodeError, open_video


class ClipError(Exception):
    """A clip that cannot be measured; `reason` is its report reason, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Clip:
    pairs: list  # [(frame, next frame)] at the analysis size, spread over the clip
    times: np.ndarray
    keys: np.ndarray
    key_times: np.ndarray
    width: int
    height: int
    fps: float
    start: float  # the window measured, seconds of the file
    end: float
    small_size: tuple  # (w, h) of the analysis frames
    probe: dict  # `probe`'s answer


def codec_name(stream) -> str:
    codec = stream.codec_context.codec
    return getattr(codec, "canonical_name", None) or codec.name


def display_rotation(matrix: bytes) -> float:
    """Degrees counter-clockwise of a display matrix (nine int32, 16.16 fixed point but the last column), as
    FFmpeg's av_display_rotation_get computes them."""
    m = np.frombuffer(matrix, dtype="<i4", count=9).astype(np.float64) / 65536.0
    scale0, scale1 = np.hypot(m[0], m[3]), np.hypot(m[1], m[4])
    if scale0 == 0 or scale1 == 0:
        return 0.0
    return -float(np.degrees(np.arctan2(m[1] / scale1, m[0] / scale0)))


def rotation(frame, stream) -> int:
    """Degrees counter-clockwise the picture is to be turned for display, in [0, 360) (PyAV's VideoFrame.rotation
    modulo 360): the display matrix the decoder attaches to the frame (FFmpeg copies the stream's to every frame;
    read from the side data, which PyAV 12 already exposes), else the legacy `rotate` tag (clockwise degrees)
    where an older FFmpeg still puts it in the stream's metadata; 0 for none."""
    for data in frame.side_data:
        if "DISPLAYMATRIX" in str(data.type).upper():
            return int(round(display_rotation(bytes(data)))) % 360
    try:
        return int(round(-float(stream.metadata.get("rotate", 0)))) % 360
    except ValueError:
        return 0


def probe(container, stream, length, rate, frame) -> dict:
    """What the container says about the file (no extra pass: `frame` is the first one decoded, which carries the
    display matrix); `duration_s` the stream's declared length (null when it declares none)."""
    audio = next((s for s in container.streams if s.type == "audio"), None)
    return {"container": container.format.name, "codec": codec_name(stream),
            "duration_s": None if length is None else round(length, 4), "fps": None if not rate else round(rate, 4),
            "width": frame.width, "height": frame.height, "rotation": rotation(frame, stream),
            "has_audio": audio is not None, "audio_codec": None if audio is None else codec_name(audio)}


def _reason(error: DecodeError) -> str:
    text = str(error)
    if "no video stream" in text:
        return "no_video"
    if "empty file" in text:
        return "zero_length"
    return "undecodable"


def small_size(width: int, height: int, side: int) -> tuple:
    """(w, h) with the longer side at most `side`, even (what swscale and the flow like), never enlarged."""
    scale = min(1.0, side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def pair_starts(frames: int, pairs: int) -> list:
    """First frames of up to `pairs` consecutive pairs, evenly spread over `frames` frames."""
    if frames < 2:
        return []
    return sorted(set(np.linspace(0, frames - 2, min(pairs, frames - 1)).round().astype(int).tolist()))


def _length(container, stream, rate):
    """Seconds of the stream: declared, else from its frame count, else its packets counted (no decoding)."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base: microseconds
    frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return frames / rate if rate and frames else None


def read_clip(path: str, side: int = 256, key_frames: int = 3, start: Optional[float] = None,
              end: Optional[float] = None, pairs: int = 8, on_frame=None) -> Clip:
    """The clip of `path` (its start / end window); `on_frame(small, t)` sees every frame at the analysis size as
    it is decoded (the scene detector), and only `pairs` consecutive pairs of them are kept (the flow's input),
    so a long clip costs the memory of a few frames."""
    import av

    try:
        container, stream = open_video(path)
    except DecodeError as e:
        raise ClipError(_reason(e), str(e)) from None
    with container:
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        length = _length(container, stream, rate)
        first = start or 0.0
        last = min(end, length) if end is not None and length is not None else (end or length)
        span = max(0.0, (last or 0.0) - first)
        want = first + (np.arange(key_frames) + 0.5) / key_frames * span  # key frames' times
        starts = set(pair_starts(int(round(span * (rate or 16.0))), pairs))
        if start:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        kept, times, keys, key_times = [], [], [], []
        size, previous = None, None
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else len(times) / (rate or 16.0)
                if start is not None and t < start - 1e-3:
                    continue
                if end is not None and t >= end - 1e-6:
                    break
                if size is None:
                    size = small_size(frame.width, frame.height, side)
                    probed = probe(container, stream, length, rate, frame)
                small = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
                if on_frame is not None:
                    on_frame(small, t)
                if len(times) - 1 in starts:
                    kept.append((previous, small))
                previous = small
                times.append(t)
                if len(key_times) < key_frames and t >= want[len(key_times)] - 1e-6:  # first frame at / after
                    keys.append(frame.to_ndarray(format="rgb24"))
                    key_times.append(t)
        except av.FFmpegError as e:
            if not times:
                raise ClipError("undecodable", f"{path}: corrupt video stream ({type(e).__name__}: {e})") from None
            # a stream broken part way: the frames before the damage are the clip (its duration tells)
        if not times:
            raise ClipError("zero_length", f"{path}: no decodable frames"
                                           + ("" if start is None else f" after {start:g} s"))
        if not keys:  # shorter than declared: its last frame
            keys, key_times = [frame.to_ndarray(format="rgb24")], [times[-1]]
        step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / (rate or 16.0)
        height, width = keys[0].shape[:2]
        return Clip(kept, np.asarray(times), np.stack(keys), np.asarray(key_times), width, height,
                    rate or 1.0 / step, times[0], times[-1] + step, size, probed)


def thumbnail(path: str, at: float, side: int = 160) -> Optional[np.ndarray]:
    """uint8 [h, w, 3]: the frame shown at `at` seconds, small; None when the file gives none (the report shows a
    blank)."""
    import av

    try:
        container, stream = open_video(path)
    except DecodeError:
        return None
    with container:
        try:
            container.seek(max(0, int(at / stream.time_base)), stream=stream, backward=True)
            shown = None
            for frame in container.decode(stream):
                if shown is not None and frame.pts is not None and float(frame.pts * stream.time_base) > at:
                    break
                size = small_size(frame.width, frame.height, side)
                shown = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
            return shown
        except av.FFmpegError:
            return None
