"""The pixel loader's scan: every manifest row probed once, from the container's metadata (no pixels decoded but a
video's first frame), before training starts, so that a file that cannot give a sample is skipped and reported up
front instead of failing a step.

    usable, skipped = scan(entries, buckets, fps=16.0, workers=4)
    usable[0]  # Scanned(entry, bucket, frames=33, height=32, width=48, first=0.0, rate=16.0)
    skipped[0] # {"id": "broken_000", "path": ".../broken_000_empty.mp4", "reason": "empty file"}

A video's length is counted as its decode will count it (`decoding.available_frames` over the timestamps of its
packets, cut to the row's `start` / `end`), so a clip the scan puts in a bucket has the bucket's frames. A video
goes to the longest video bucket it fills (nearest aspect first, `buckets.assign_bucket`); one shorter than every
video bucket goes to an image bucket when the set has one (one of its frames is the sample), else is skipped.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megawan.data.buckets import Bucket, assign_bucket
from megawan.data.decoding import DecodeError, available_frames, open_video
from megawan.data.manifest import ManifestEntry
from megawan.data.video import decode_image
from megawan.data.webdataset import local_copy


@dataclass(frozen=True)
class Scanned:
    entry: ManifestEntry
    bucket: Bucket
    frames: int  # the frames the clip holds at `rate` (1 for an image)
    height: int
    width: int
    first: float  # the time (s) of the clip's first sampling point
    rate: float  # the rate (fps) it is sampled at: the row's `fps`, else the loader's


def probe_video_window(path: str, rate: float, start: Optional[float], end: Optional[float]) -> tuple:
    """(frames at `rate` inside [start, end), height, width, first sampling time) of a video; DecodeError when it
    cannot be read. Only the first frame is decoded; the rest is read from the packets' timestamps."""
    import av

    container, stream = open_video(path)
    with container:
        try:
            first_frame = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise DecodeError(path, f"corrupt video stream ({type(e).__name__}: {e})") from None
        if first_frame is None:
            raise DecodeError(path, "no decodable frames")
        container.seek(0)
        ticks = []
        try:
            for packet in container.demux(stream):
                if packet.size and (packet.pts is not None or packet.dts is not None):
                    ticks.append(packet.pts if packet.pts is not None else packet.dts)
        except av.FFmpegError:
            pass  # truncated: the decode reads the packets before the damage, as counted here
        times = np.sort(np.asarray(ticks, dtype=np.float64)) * float(stream.time_base)
        height, width = first_frame.height, first_frame.width
    if start is not None:
        times = times[times >= start - 1e-6]  # decode_video_pyav's window
    if end is not None:
        times = times[times < end]
    if len(times) == 0:
        raise DecodeError(path, "no frames in the requested window")
    count = len(available_frames(times, rate, start, end))
    return count, height, width, float(start if start is not None else times[0])


def _bucket_for(buckets: list, entry: ManifestEntry, frames: int, height: int, width: int, rate: float) -> tuple:
    """(bucket, None) or (None, why not)."""
    bucket = assign_bucket(buckets, frames=frames, height=height, width=width)
    if bucket is None and frames > 1:
        bucket = assign_bucket(buckets, frames=1, height=height, width=width)  # a frame of it as an image
    if bucket is not None:
        return bucket, None
    if entry.is_image:
        return None, "an image, and the bucket set has no image bucket"
    shortest = min(b.frames for b in buckets if not b.is_image)
    return None, (f"too short: {frames} frame{'' if frames == 1 else 's'} at {rate:g} fps, the shortest video "
                  f"bucket has {shortest} (and the bucket set has no image bucket)")


def scan_entry(entry: ManifestEntry, buckets: list, fps: float) -> tuple:
    """(Scanned, None) for a usable row, (None, reason) for one that is not; never raises for a bad file."""
    if entry.problem is not None:
        return None, entry.problem
    rate = entry.fps or fps
    try:
        with local_copy(entry.path) as path:
            if entry.is_image:
                height, width = decode_image(path).shape[1:3]
                frames, first = 1, 0.0
            else:
                frames, height, width, first = probe_video_window(path, rate, entry.start, entry.end)
    except DecodeError as e:
        return None, e.reason
    except (ImportError, NameError, AttributeError, TypeError):
        raise  # our bug or a broken install, not a bad file: skipping every clip would hide it
    except Exception as e:  # a library choking on one odd file is that file's problem, not the whole run's
        return None, f"cannot be read ({type(e).__name__}: {e})"
    bucket, reason = _bucket_for(buckets, entry, frames, int(height), int(width), rate)
    if bucket is None:
        return None, reason
    return Scanned(entry, bucket, frames, int(height), int(width), first, rate), None


def scan(entries: list, buckets: list, fps: float, workers: int = 4) -> tuple:
    """([Scanned] in manifest order, [{"id", "path", "reason"}]) over every entry, probed by `workers` threads
    (PyAV and PIL release the GIL while reading). The same answer on every rank and every run."""
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        results = list(pool.map(lambda e: scan_entry(e, buckets, fps), entries, chunksize=1))
    usable, skipped = [], []
    for entry, (found, reason) in zip(entries, results):
        if found is None:
            skipped.append({"id": entry.id, "path": entry.path, "reason": reason})
        else:
            usable.append(found)
    return usable, skipped


def temporal_offsets(frames: int, length: int) -> int:
    """How many start positions a `length`-frame sample has in a clip of `frames` frames."""
    return max(frames - length + 1, 1)


def crop_origin(size: int, window: int, u: Optional[float]) -> int:
    """Where a `window` starts in `size`: centred for u None, else at floor(u * (size - window + 1))."""
    if u is None:
        return (size - window) // 2
    return min(int(math.floor(u * (size - window + 1))), size - window)
