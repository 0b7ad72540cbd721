"""The pixel loader's scan: every manifest row probed once, from the container's metadata (no pixels decoded but a
video's first frame), before training starts, so that a file that cannot give a sample is skipped and reported up
front instead of failing a step.

    usable, skipped = scan(entries, buckets, fps=16.0, workers=4)
    usable[0]  # Scanned(entry, buckets=(Bucket(17, 32, 48), Bucket(33, 32, 48)), frames=33, height=32, width=48,
               #         first=0.0, rate=16.0)
    skipped[0] # {"id": "broken_000", "path": ".../broken_000_empty.mp4", "reason": "empty file"}

A video's length is counted as its decode will count it (`decoding.available_frames` over the timestamps of its
packets, cut to the row's `start` / `end`), so a clip the scan puts in a bucket has the bucket's frames. Unlike
the latent store (one bucket per clip), a VAE trains every length and resolution a clip can give
(`buckets_for`): of the buckets at the aspect ratio nearest its own, every video bucket it fills, at each
resolution it has the pixels for. A video shorter than every video bucket goes to the image buckets when the set
has them (one of its frames is the sample), else is skipped.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megawan.data.decoding import DecodeError, available_frames, check_crop, decode_first_frame, open_video
from megawan.data.manifest import ManifestEntry
from megawan.data.video import decode_image
from megawan.data.webdataset import local_copy


@dataclass(frozen=True)
class Scanned:
    entry: ManifestEntry
    buckets: tuple  # the Buckets it trains (`buckets_for`)
    frames: int  # the frames the clip holds at `rate` (1 for an image)
    height: int
    width: int
    first: float  # the time (s) of the clip's first sampling point
    rate: float  # the rate (fps) it is sampled at: the row's `fps`, else the loader's
    origin: float = 0.0  # the time (s) of its first frame in the window, and the median step between frames:
    frame_step: float = 0.0  # a later start is put on a frame's time (`PixelLoader`), so that frame is its first


def probe_video_window(path: str, rate: float, start: Optional[float], end: Optional[float]) -> tuple:
    """(frames at `rate` inside [start, end), height, width, first sampling time, first frame's time, median frame
    step) of a video; DecodeError when it cannot be read. Only the first frame is decoded; the rest is read from
    the packets' timestamps."""
    import av

    container, stream = open_video(path)
    with container:
        first_frame = decode_first_frame(container, stream, path)
        container.seek(0)
        ticks = []
        try:
            for packet in container.demux(stream):
                if packet.size and (packet.pts is not None or packet.dts is not None):
                    ticks.append(packet.pts if packet.pts is not None else packet.dts)
                    if end is not None and packet.dts is not None and packet.dts * stream.time_base > end + 1:
                        break  # decode order passed the window's end by a second: no later frame is shown in it
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
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / rate
    return count, height, width, float(start if start is not None else times[0]), float(times[0]), step


def buckets_for(buckets: list, frames: int, height: int, width: int) -> tuple:
    """The buckets a clip of `frames` frames (1: an image) of height x width trains: those of the aspect ratio
    nearest its own (`buckets.assign_bucket`'s rule) that it fills (images: the image buckets; videos: the video
    buckets no longer than it, else, with none, the image buckets: a frame of it), at every resolution it has the
    pixels for (a cover resize that does not upscale), or, smaller than all of them, the smallest (upscaled)."""
    fits = [b for b in buckets if b.is_image] if frames == 1 else \
        [b for b in buckets if not b.is_image and b.frames <= frames] or [b for b in buckets if b.is_image]
    if not fits:
        return ()
    aspect = math.log(width / height)
    nearest = min(round(abs(math.log(b.aspect) - aspect), 6) for b in fits)
    fits = [b for b in fits if round(abs(math.log(b.aspect) - aspect), 6) == nearest]
    sharp = [b for b in fits if max(b.height / height, b.width / width) <= 1.0]
    smallest = min(b.height * b.width for b in fits)
    return tuple(sorted(sharp or [b for b in fits if b.height * b.width == smallest]))


def _no_bucket(buckets: list, entry: ManifestEntry, frames: int, rate: float) -> str:
    if entry.is_image:
        return "an image, and the bucket set has no image bucket"
    shortest = min(b.frames for b in buckets if not b.is_image)
    return (f"too short: {frames} frame{'' if frames == 1 else 's'} at {rate:g} fps, the shortest video "
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
                frames, first, origin, step = 1, 0.0, 0.0, 0.0
            else:
                frames, height, width, first, origin, step = probe_video_window(path, rate, entry.start, entry.end)
            height, width = check_crop(entry.crop, int(height), int(width), entry.path)  # a letterbox's picture
    except DecodeError as e:
        return None, e.reason
    except (ImportError, NameError, AttributeError, TypeError):
        raise  # our bug or a broken install, not a bad file: skipping every clip would hide it
    except Exception as e:  # a library choking on one odd file is that file's problem, not the whole run's
        return None, f"cannot be read ({type(e).__name__}: {e})"
    found = buckets_for(buckets, frames, int(height), int(width))
    if not found:
        return None, _no_bucket(buckets, entry, frames, rate)
    return Scanned(entry, found, frames, int(height), int(width), first, rate, origin, step), None


def scan(entries: list, buckets: list, fps: float, workers: int = 4, group=None) -> tuple:
    """([Scanned] in manifest order, [{"id", "path", "reason"}]) over every entry, probed by `workers` threads
    (PyAV and PIL release the GIL while reading). The same answer on every rank and every run. `group`: a
    torch.distributed process group whose ranks share the work (each probes every n-th row, then all gather);
    every rank of it must call scan. None: this process probes every row."""
    rank, size = 0, 1
    if group is not None:
        import torch.distributed as dist

        rank, size = dist.get_rank(group), dist.get_world_size(group)
    mine = entries[rank::size]
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        results = list(pool.map(lambda e: scan_entry(e, buckets, fps), mine))
    if size > 1:
        gathered = [None] * size
        dist.all_gather_object(gathered, results, group=group)
        results = [None] * len(entries)
        for r, part in enumerate(gathered):
            results[r::size] = part
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
