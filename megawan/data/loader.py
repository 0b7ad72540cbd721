"""The training loader: bucket-homogeneous batches from the latent store, images and videos mixed at a
stage's ratio, shuffled by (seed, epoch), split over data-parallel ranks, read ahead by worker threads, and
resumable to exactly the next batch on any data-parallel size.

    loader = BucketedLoader("latents.zarr", global_batch_size={"image": 64, "video": 8}, video_ratio=0.5,
                            seed=0, dp_rank=dp_rank, dp_size=dp_size, num_workers=4)
    for batch in loader:              # batch["latents"]: [b, z, T', H', W'] of one bucket, batch["weight"]: [b]
        ...                           # an image-conditioned store adds batch["cond_latents"] (like latents),
                                      # ["cond_mask"] uint8 [b, 4, T'] and ["clip_tokens"] [b, tokens, width]
    state = loader.state_dict()       # saved with the checkpoint; BucketedLoader(...).load_state_dict(state)

How batches are planned (every rank computes the same plan; it depends on the store, the seed and the
global batch sizes, never on the number of ranks, so a job resumes on any DP size):
- images (1-frame buckets) and videos form two streams, each with its own epochs. Global step s draws from
  the video stream when floor((s + 1) r) > floor(s r) (r = video_ratio): the ratio holds exactly at every
  point of training, with no randomness to replay.
- an epoch of a stream: each bucket's samples in a permutation drawn from (seed, stream, epoch, bucket), cut
  into ceil(n / G) global batches of near-equal size (at most G, the bucket's global batch size): no sample
  of the epoch is dropped or repeated; then the order of all the stream's batches is shuffled by
  (seed, stream, epoch). Batches never mix buckets.
- a global batch of g samples goes to the DP ranks in contiguous slices of ceil(g / dp); a rank whose slice
  is short is topped up with copies of its first sample with `weight` 0, so every rank of a step has the same
  shape. Losses are sum(weight * loss) / batch["global_samples"] (times dp under megatron's averaging DDP).
TP, CP and PP ranks of one model replica pass the same dp_rank and get the same batch.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from megawan.data.buckets import Bucket
from megawan.data.store import TRAINING_TENSORS, BucketReader, LatentStore

STREAMS = ("image", "video")


@dataclass(frozen=True)
class PlannedBatch:
    step: int
    stream: str
    epoch: int
    bucket: str
    indices: np.ndarray  # this global batch's sample indices in the bucket (all DP ranks together)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _stable(text: str) -> int:
    """A stable integer for a string (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode())


def split_even(n: int, parts: int) -> list:
    """Sizes of `parts` contiguous pieces of n items, differing by at most one, larger first."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class BatchPlan:
    """The deterministic sequence of global batches (see the module docstring)."""

    def __init__(self, counts: dict, global_batch_size: dict, video_ratio: float, seed: int):
        self.counts, self.batch_size, self.ratio, self.seed = dict(counts), dict(global_batch_size), video_ratio, seed
        self.streams = {s: sorted(b for b in counts if counts[b] > 0 and _stream(b) == s) for s in STREAMS}
        if not 0.0 <= video_ratio <= 1.0:
            raise ValueError(f"video_ratio={video_ratio} is not within [0, 1]")
        for stream, wanted in (("video", video_ratio > 0), ("image", video_ratio < 1)):
            if wanted and not self.streams[stream]:
                raise ValueError(f"video_ratio={video_ratio} asks for {stream} batches but the store has no "
                                 f"non-empty {stream} bucket among {sorted(counts)}")
        self._epochs: dict = {}

    def stream_at(self, step: int) -> str:
        r = self.ratio
        return "video" if math.floor((step + 1) * r + 1e-9) > math.floor(step * r + 1e-9) else "image"

    def epoch_batches(self, stream: str, epoch: int) -> list:
        """[(bucket, indices)] of one epoch of a stream, in training order."""
        key = (stream, epoch)
        if key not in self._epochs:
            batches = []
            for bucket in self.streams[stream]:
                n, size = self.counts[bucket], self.batch_size[bucket]
                order = _rng(self.seed, STREAMS.index(stream), epoch, _stable(bucket)).permutation(n)
                start = 0
                for g in split_even(n, math.ceil(n / size)):
                    batches.append((bucket, order[start:start + g]))
                    start += g
            order = _rng(self.seed, STREAMS.index(stream), epoch, 7919).permutation(len(batches))
            self._epochs = {k: v for k, v in self._epochs.items() if k[0] != stream}  # keep one epoch per stream
            self._epochs[key] = [batches[i] for i in order]
        return self._epochs[key]

    def batches(self, start_step: int, positions: dict):
        """Global batches from `start_step`; positions[stream] = (epoch, batches of it already drawn)."""
        positions = dict(positions)
        step = start_step
        while True:
            stream = self.stream_at(step)
            epoch, done = positions[stream]
            plan = self.epoch_batches(stream, epoch)
            if done >= len(plan):
                epoch, done = epoch + 1, 0
                plan = self.epoch_batches(stream, epoch)
            bucket, indices = plan[done]
            positions[stream] = (epoch, done + 1)
            yield PlannedBatch(step, stream, epoch, bucket, indices), dict(positions)
            step += 1


def _stream(bucket: str) -> str:
    return "image" if Bucket.from_name(bucket).is_image else "video"


class BucketedLoader:
    def __init__(self, store: Union[str, LatentStore], global_batch_size: Union[int, dict], video_ratio: float = 1.0,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1, buckets: Optional[list] = None,
                 num_workers: int = 2, prefetch: int = 2):
        """global_batch_size: one int, or a dict keyed by bucket name and / or "image" / "video" (bucket wins).
        buckets: the bucket names this stage trains on (default: every bucket of the store)."""
        self.store = LatentStore.open(store) if isinstance(store, str) else store
        names = self.store.buckets() if buckets is None else list(buckets)
        missing = [b for b in names if b not in self.store.buckets()]
        if missing:
            raise ValueError(f"bucket(s) {missing} are not in the store {self.store.path} "
                             f"(it has {self.store.buckets()})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        counts = {b: self.store.count(b) for b in names}
        sizes = {}
        for b in names:
            size = global_batch_size if isinstance(global_batch_size, int) else \
                global_batch_size.get(b, global_batch_size.get(_stream(b)))
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"no positive global batch size for bucket {b} in {global_batch_size!r}")
            sizes[b] = size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch = num_workers, prefetch
        self.plan = BatchPlan(counts, sizes, video_ratio, seed)
        self._state = {"step": 0, "positions": {s: (0, 0) for s in STREAMS}, "counts": counts,
                       "seed": seed, "video_ratio": video_ratio, "global_batch_size": sizes}
        self._readers: dict = {}

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch comes from (plus what the plan depends on). Independent of the DP size."""
        s = self._state
        return {"step": s["step"], "positions": {k: list(v) for k, v in s["positions"].items()},
                "counts": dict(s["counts"]), "seed": s["seed"], "video_ratio": s["video_ratio"],
                "global_batch_size": dict(s["global_batch_size"])}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "video_ratio", "global_batch_size"):
            if state[key] != self._state[key]:
                raise ValueError(f"the loader state was saved with {key}={state[key]!r}, this loader has "
                                 f"{self._state[key]!r}: a resumed stage keeps its data settings")
        # the plan of the saved run, even if the store has grown since (new samples wait for a new stage)
        self.plan = BatchPlan(state["counts"], self._state["global_batch_size"], state["video_ratio"], state["seed"])
        self._state.update(step=int(state["step"]), counts=dict(state["counts"]),
                           positions={k: tuple(v) for k, v in state["positions"].items()})

    # ------------------------------------------------------------------------------------------
    def _reader(self, bucket: str) -> BucketReader:
        if bucket not in self._readers:
            self._readers[bucket] = self.store.bucket_reader(bucket, self._state["counts"][bucket])
        return self._readers[bucket]

    def offset(self, planned: PlannedBatch) -> int:
        """Where this rank's slice starts in the global batch (the trainer seeds each sample's noise by it)."""
        return sum(split_even(len(planned.indices), self.dp_size)[: self.dp_rank])

    def local_slice(self, planned: PlannedBatch) -> tuple:
        """(this rank's sample indices, weights): ceil(g / dp) entries, padded with weight-0 copies."""
        sizes = split_even(len(planned.indices), self.dp_size)
        start = sum(sizes[: self.dp_rank])
        mine = [int(i) for i in planned.indices[start:start + sizes[self.dp_rank]]]
        width = sizes[0]
        weights = [1.0] * len(mine) + [0.0] * (width - len(mine))
        if not mine:  # fewer samples than ranks: this rank computes a copy of the batch's first, weight 0
            mine = [int(planned.indices[0])]
        mine += [mine[0]] * (width - len(mine))
        return mine, weights

    def _load(self, planned: PlannedBatch) -> dict:
        indices, weights = self.local_slice(planned)
        reader = self._reader(planned.bucket)
        rows = [reader.read(i) for i in indices]
        batch = {"bucket": planned.bucket, "stream": planned.stream, "step": planned.step, "epoch": planned.epoch,
                 "text_length": torch.tensor([r["text_length"] for r in rows]), "ids": [r["id"] for r in rows],
                 "indices": indices, "weight": torch.tensor(weights), "global_samples": len(planned.indices),
                 "offset": self.offset(planned)}
        for key in TRAINING_TENSORS:  # latents, text, and an image-conditioned store's conditioning
            if key in rows[0]:
                batch[key] = torch.stack([r[key] for r in rows])
        return batch

    def __iter__(self):
        """Batches from the saved position on; the state moves as each batch is handed out."""
        stream = self.plan.batches(self._state["step"], self._state["positions"])
        ahead = deque()
        with ThreadPoolExecutor(max_workers=max(self.num_workers, 1)) as pool:
            while True:
                while len(ahead) < max(self.prefetch, 1) * max(self.num_workers, 1):
                    planned, positions = next(stream)
                    ahead.append((pool.submit(self._load, planned), planned, positions))
                future, planned, positions = ahead.popleft()
                batch = future.result()
                self._state["step"], self._state["positions"] = planned.step + 1, positions
                yield batch
