"""The VAE's data: clips and images decoded from a manifest on the fly (PyAV on the CPU, DALI on the rank's GPU
through `megawan.data.video.decode_video`), resized to cover a bucket and cropped, in global batches that every
data-parallel rank computes alike and slices, resumable to exactly the next batch.

    loader = PixelLoader("clips.jsonl", buckets=["17x32x32", "1x32x32"], global_batch_size=8, seed=0,
                         dp_rank=r, dp_size=n, num_workers=2, fps=16.0, decode="auto", random_crop=True,
                         report="run/skipped.jsonl", stride=(4, 8, 8))
    for batch in loader:                # endless; one bucket per step, the same on every DP rank
        batch["video"]                  # float32 [global / dp, 3, T, H, W] in [-1, 1]: this rank's slice
        batch["sample_index"]           # each local sample's place in the global batch (0 .. global - 1)
        batch["bucket"], batch["epoch"], batch["global_samples"], batch["ids"], batch["step"]
    state = loader.state_dict()         # JSON-able; PixelLoader(...).load_state_dict(state) resumes exactly

How it works (every rank computes the same, from the manifest, the buckets, the seed and the global batch size;
never from the number of ranks or workers):
- the scan (`megawan.data.pixel_scan`) probes every row once: undecodable files and clips too short for every
  bucket are skipped, written to `report` (JSON lines {"id", "path", "reason"}) and counted in one printed line.
  Each rank scans (the same answer everywhere); rank 0 writes the report.
- step s draws its bucket: with `video_ratio` None, bucket b with probability count(b) / total from a generator
  seeded by (seed, s); with a ratio, the video / image stream as the latent loader does (`loader.BatchPlan`'s
  exact floor rule), then a bucket of that stream weighted by its count.
- each bucket is an endless stream of epochs, each a permutation of its samples seeded by (seed, epoch, bucket);
  a step takes the next `global_batch_size` samples of its bucket's stream (a batch may run into the next epoch).
  The state is the step and how many samples each bucket has handed out.
- DP rank r takes the r-th of `split_even(global, dp)` contiguous slices (`sample_index` says which places).
- a sample trains every bucket it can fill (`pixel_scan.buckets_for`: the nearest aspect ratio, every length it
  has, every resolution it has the pixels for); its crop there (and, for a clip longer than the bucket, which
  frames) is drawn from (seed, epoch, sample id, bucket): the same on any rank, worker or resume.
  `random_crop=False`: centred, from the clip's first frame.
- a file that fails to decode mid-run (the scan found it fine) is replaced by the next sample of its bucket (in
  manifest order) and reported (a JSON line with "step"), never a crash; the same file always gives the same
  replacement, so the batch does not depend on which worker met it first.
- `num_workers` threads decode the samples of the next steps ahead (PyAV, PIL and torch's resize release the GIL);
  0 decodes in the calling thread. Workers change when a batch is ready, never what it holds.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from megawan import capabilities
from megawan.config.fields import ConfigError
from megawan.data.buckets import Bucket, cover_crop, parse_buckets
from megawan.data import dali
from megawan.data.decoding import DecodeError, crop_frames
from megawan.data.loader import split_even
from megawan.data.pixel_scan import Scanned, crop_origin, scan, temporal_offsets
from megawan.data.video import BACKENDS, decode_image, decode_video
from megawan.data.webdataset import local_copy, read_entries
from megawan.utils.user_errors import UserError


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _stable(text: str) -> int:
    """A stable integer for a string (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode())


def to_bucket(frames: np.ndarray, height: int, width: int, u: Optional[tuple] = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, height, width] in [-1, 1]: scaled (antialiased bilinear, aspect kept) to
    cover the target, then the window at (u_top, u_left) fractions of the free room, centred for u None. A few
    frames at a time: a 1080p clip in float32 at once would hold ~25 MB per frame in every decoding thread."""
    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:  # PIL's arrays are read-only; torch wants to own writable memory
        frames = frames.copy()
    source = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, 3, H, W] uint8
    crop = cover_crop(source.shape[-2], source.shape[-1], height, width)
    top = crop_origin(crop.resized[0], height, None if u is None else u[0])
    left = crop_origin(crop.resized[1], width, None if u is None else u[1])
    out = torch.empty(3, len(frames), height, width)
    for first in range(0, len(frames), 4):  # each frame is resized alone, so chunks give the frames of one call
        video = source[first:first + 4].float()
        if crop.resized != tuple(video.shape[-2:]):
            video = F.interpolate(video, size=crop.resized, mode="bilinear", antialias=True, align_corners=False)
        video = video[..., top:top + height, left:left + width]
        out[:, first:first + 4] = (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)
    return out


def clip_start(sample: Scanned, offset: int) -> float:
    """Where a sample starting `offset` frames (at its rate) into the clip starts: that sampling time put back on
    the time of the frame shown then. A decode window starting between two frames would begin with the later one
    (the frames before `start` are dropped), a first step shorter than the others; from a frame's own time, the
    clip is evenly spaced at the rate, a fraction of a source frame later than the scan's grid."""
    t = sample.first + offset / sample.rate
    if sample.frame_step > 0:
        t = sample.origin + np.floor((t - sample.origin) / sample.frame_step + 1e-3) * sample.frame_step
    return max(t, sample.entry.start or 0.0)


class PixelLoader:
    def __init__(self, manifest: Union[str, list], buckets: list, global_batch_size: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 2, fps: float = 16.0, decode: str = "auto",
                 random_crop: bool = True, report: Optional[str] = None, stride: tuple = (4, 8, 8),
                 video_ratio: Optional[float] = None, prefetch: int = 2, verbose: bool = True, scan_group=None):
        """manifest: a .jsonl / .csv manifest or WebDataset shards (`webdataset.read_entries`), or a list of
        ManifestEntry. buckets: "FxHxW" names (frames 1 or 1 + stride[0] k; H, W multiples of stride[1], stride[2]).
        report: the JSONL file of skipped / failed samples (None: not written). scan_group: a torch.distributed
        group (e.g. the DP group) whose ranks split the scan and gather it (all of them build their loader at
        once); None: each process scans every row. Either way every rank ends with the same samples."""
        if not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise ConfigError(f"data.global_batch_size: {global_batch_size!r} is not a positive integer")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch_size % dp_size:
            raise ConfigError(f"data.global_batch_size: {global_batch_size} is not divisible by the data-parallel "
                              f"size {dp_size} (every rank takes the same number of samples)")
        if decode not in BACKENDS:
            raise ConfigError(f"data.decode: {decode!r} is not one of {' | '.join(BACKENDS)}")
        if decode == "dali-gpu" and not capabilities.cuda_available():
            raise ConfigError("data.decode: dali-gpu decodes with NVDEC on a CUDA device and this machine has none; "
                              "use dali-cpu (VP8 / VP9 / MJPEG), pyav (every codec) or auto")
        if decode.startswith("dali-") and not dali.dali_available():
            raise ConfigError(f"data.decode: {decode} needs NVIDIA DALI, which does not import here "
                              "(pip install nvidia-dali-cuda120); use pyav or auto")
        if not fps > 0:
            raise ConfigError(f"data.fps: {fps!r} is not positive")
        if video_ratio is not None and not 0.0 <= video_ratio <= 1.0:
            raise ConfigError(f"data.video_ratio: {video_ratio} is not within [0, 1]")
        if stride[1] != stride[2]:
            raise ValueError(f"stride {stride}: the VAE's height and width strides differ")
        buckets = [buckets] if isinstance(buckets, str) else list(buckets)
        try:
            self.buckets = parse_buckets(buckets, grid=stride[1], temporal_stride=stride[0])
        except ValueError as e:
            raise ConfigError(f"data.buckets: {e} (the VAE's stride is {tuple(stride)})") from None
        if not self.buckets:
            raise ConfigError("data.buckets: empty")
        self.global_batch_size, self.seed, self.video_ratio = global_batch_size, int(seed), video_ratio
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch, self.decode, self.random_crop = num_workers, prefetch, decode, random_crop
        self.report, self.source = report, manifest if isinstance(manifest, str) else "the given entries"
        entries = read_entries(manifest) if isinstance(manifest, str) else list(manifest)
        usable, self.skipped = scan(entries, self.buckets, fps, workers=max(num_workers, 4), group=scan_group)
        self.samples = {b.name: [s for s in usable if b in s.buckets] for b in self.buckets}
        self.counts = {name: len(found) for name, found in self.samples.items()}
        self.names = [name for name in sorted(self.counts) if self.counts[name]]
        self.failed: list = []  # mid-run decode failures, as reported
        self._bad: dict = {}  # id -> reason, for files that failed mid-run
        self._lock = threading.Lock()
        if dp_rank == 0 and report:
            os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
            with open(report, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.skipped)
        if not self.names:
            raise UserError(f"{self.source}: none of its {len(entries)} rows gives a sample for the buckets "
                            f"{[b.name for b in self.buckets]}" + (f" (reasons in {report})" if report else ""))
        if video_ratio is not None:
            for stream, wanted in (("video", video_ratio > 0), ("image", video_ratio < 1)):
                if wanted and not self._stream_names(stream):
                    raise ConfigError(f"data.video_ratio: {video_ratio} asks for {stream} batches but no "
                                      f"{stream} bucket has samples ({self.counts})")
        if verbose and dp_rank == 0:
            where = f" (reasons in {report})" if report and self.skipped else ""
            print(f"pixel data: {len(usable)} samples from {self.source} in buckets "
                  f"{', '.join(f'{n}: {c}' for n, c in self.counts.items())}; {len(self.skipped)} skipped{where}",
                  flush=True)
            crop = "a random crop (seeded)" if random_crop else "the centre crop"
            print(f"pixel data: each sample is resized to cover its bucket (aspect kept), then {crop} is taken",
                  flush=True)
        self._orders: dict = {}
        self._state = {"step": 0, "cursors": {name: 0 for name in self.names}}

    # ------------------------------------------------------------------------------------------
    def _stream_names(self, stream: str) -> list:
        return [n for n in self.names if Bucket.from_name(n).is_image == (stream == "image")]

    def bucket_at(self, step: int) -> str:
        """The bucket of global step `step` (a function of the seed and the step only)."""
        names = self.names
        if self.video_ratio is not None:
            r = self.video_ratio
            video = int(np.floor((step + 1) * r + 1e-9)) > int(np.floor(step * r + 1e-9))  # loader.BatchPlan's rule
            names = self._stream_names("video" if video else "image")
        weights = np.cumsum([self.counts[n] for n in names])
        draw = int(_rng(self.seed, step, 104729).integers(int(weights[-1])))
        return names[int(np.searchsorted(weights, draw, side="right"))]

    def _order(self, bucket: str, epoch: int) -> np.ndarray:
        key = (bucket, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.names):
                self._orders.clear()
            self._orders[key] = _rng(self.seed, epoch, _stable(bucket)).permutation(self.counts[bucket])
        return self._orders[key]

    def plan(self, step: int, cursors: dict) -> tuple:
        """(bucket, [(epoch, sample index in the bucket)] of the global batch, the cursors after it)."""
        bucket = self.bucket_at(step)
        n, at = self.counts[bucket], cursors[bucket]
        members = [((at + k) // n, int(self._order(bucket, (at + k) // n)[(at + k) % n]))
                   for k in range(self.global_batch_size)]
        return bucket, members, {**cursors, bucket: at + self.global_batch_size}

    def local_places(self) -> list:
        """This rank's places in every global batch: its contiguous `split_even` slice."""
        sizes = split_even(self.global_batch_size, self.dp_size)
        start = sum(sizes[: self.dp_rank])
        return list(range(start, start + sizes[self.dp_rank]))

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch comes from (plus what the plan depends on). Independent of the DP size."""
        s = self._state
        return {"step": s["step"], "cursors": dict(s["cursors"]), "seed": self.seed,
                "global_batch_size": self.global_batch_size, "video_ratio": self.video_ratio,
                "counts": {n: self.counts[n] for n in self.names}, "fingerprint": self.fingerprint()}

    def fingerprint(self) -> int:
        """The samples each bucket holds, in order: a resume must see the same ones to continue the same stream."""
        return _stable(json.dumps({n: [s.entry.id for s in self.samples[n]] for n in self.names}, sort_keys=True))

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size", "video_ratio"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the pixel loader state was saved with {key}={state[key]!r}, this loader has "
                                 f"{getattr(self, key)!r}: a resumed run keeps its data settings")
        if state["counts"] != {n: self.counts[n] for n in self.names} or state["fingerprint"] != self.fingerprint():
            # files damaged, removed or added since: refusing would strand the run's training; this goes on from the
            # saved position with today's samples (batches from here differ from those the saved run would have had)
            print(f"pixel data: the usable samples differ from those of the saved run (per bucket now "
                  f"{ {n: self.counts[n] for n in self.names} }, then {state['counts']}): the manifest or its files "
                  f"changed; continuing from the saved position with the current samples", flush=True)
        cursors = {n: int(state["cursors"].get(n, 0)) for n in self.names}
        self._state = {"step": int(state["step"]), "cursors": cursors}

    # ------------------------------------------------------------------------------------------
    def _decode(self, sample: Scanned, bucket: Bucket, epoch: int, centre: bool = False) -> tuple:
        """(float32 [3, T, H, W] in [-1, 1], its id): the sample's frames for `bucket`, resized and cropped."""
        entry = sample.entry
        rng = _rng(self.seed, epoch, _stable(entry.id), _stable(bucket.name))
        offset, u = 0, None
        if self.random_crop and not centre:
            offset = int(rng.integers(temporal_offsets(sample.frames, bucket.frames)))
            u = (float(rng.random()), float(rng.random()))
        with local_copy(entry.path) as path:
            if entry.is_image:
                frames = decode_image(path)
            else:
                start = entry.start if offset == 0 else clip_start(sample, offset)
                frames = decode_video(path, fps=sample.rate, num_frames=bucket.frames, start=start, end=entry.end,
                                      backend=self.decode)
        if len(frames) < bucket.frames:
            raise DecodeError(entry.path, f"gave {len(frames)} frames, the scan counted {sample.frames}")
        frames = crop_frames(frames[: bucket.frames], entry.crop, entry.path)  # the row's letterbox crop, first
        return to_bucket(frames, bucket.height, bucket.width, u), entry.id

    def _fail(self, sample: Scanned, bucket: str, reason: str, step: int) -> None:
        with self._lock:
            if sample.entry.id in self._bad:
                return
            self._bad[sample.entry.id] = reason
            row = {"id": sample.entry.id, "path": sample.entry.path, "reason": reason, "step": step}
            self.failed.append(row)
            if self.report:
                with open(self.report, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
        print(f"pixel data: {sample.entry.path} failed to decode ({reason}); replaced by the next sample of "
              f"bucket {bucket}", flush=True)

    def load_sample(self, bucket: str, epoch: int, index: int, step: int, centre: bool = False) -> tuple:
        """(video, id) of sample `index` of `bucket`, or of the next one that decodes (reporting those that do not);
        `centre`: the centre crop from the first frame whatever `random_crop` says."""
        found, shape = self.samples[bucket], Bucket.from_name(bucket)
        for k in range(len(found)):
            sample = found[(index + k) % len(found)]
            if sample.entry.id in self._bad:
                continue
            try:
                return self._decode(sample, shape, epoch, centre)
            except DecodeError as e:
                self._fail(sample, bucket, e.reason, step)
            except (ImportError, NameError, AttributeError, TypeError):
                raise  # our bug or a broken install
            except Exception as e:  # a decoder choking on one odd file must not end the run
                self._fail(sample, bucket, f"decoder failed ({type(e).__name__}: {e})", step)
        raise UserError(f"{self.source}: every sample of bucket {bucket} failed to decode (see the report)")

    def held_out(self, per_bucket: int) -> list:
        """[{"id", "bucket", "video": float32 [3, T, H, W]}]: the first `per_bucket` samples of each bucket (manifest
        order; one failing to decode is replaced by the next), centre-cropped from the first frame. A fixed set for
        validation and evaluation: the same on every call, rank and run."""
        out = []
        for bucket in self.names:
            seen = set()
            for index in range(min(per_bucket, self.counts[bucket])):
                video, sample_id = self.load_sample(bucket, 0, index, -1, centre=True)
                if sample_id not in seen:  # a replacement already in the set is not counted twice
                    seen.add(sample_id)
                    out.append({"id": sample_id, "bucket": bucket, "video": video})
        return out

    def _batch(self, step: int, bucket: str, members: list, videos: list) -> dict:
        places = self.local_places()
        return {"video": torch.stack([v for v, _ in videos]), "ids": [i for _, i in videos],
                "sample_index": places, "bucket": bucket, "epoch": members[places[0]][0], "step": step,
                "global_samples": self.global_batch_size}

    def __iter__(self):
        """Batches from the saved position on; the state moves as each batch is handed out."""
        step, cursors = self._state["step"], dict(self._state["cursors"])
        places = self.local_places()
        if self.num_workers <= 0:
            while True:
                bucket, members, cursors = self.plan(step, cursors)
                videos = [self.load_sample(bucket, *members[p], step) for p in places]
                self._state = {"step": step + 1, "cursors": cursors}
                yield self._batch(step, bucket, members, videos)
                step += 1
        ahead = deque()
        # enough steps ahead to keep every worker busy (prefetch x workers samples in flight, at least prefetch steps)
        depth = max(self.prefetch, 1, -(-self.prefetch * self.num_workers // len(places)))
        # torch's current CUDA device is per thread: DALI's GPU decode in a worker must see this rank's device
        init = (torch.cuda.set_device, (capabilities.rank_device(),)) if capabilities.cuda_available() else (None, ())
        with ThreadPoolExecutor(max_workers=self.num_workers, initializer=init[0], initargs=init[1]) as pool:
            while True:
                while len(ahead) < depth:
                    bucket, members, cursors = self.plan(step, cursors)
                    futures = [pool.submit(self.load_sample, bucket, *members[p], step) for p in places]
                    ahead.append((step, bucket, members, futures, cursors))
                    step += 1
                at, bucket, members, futures, after = ahead.popleft()
                batch = self._batch(at, bucket, members, [f.result() for f in futures])
                self._state = {"step": at + 1, "cursors": after}
                yield batch
