"""The Zarr v3 latent store: VAE latents and umT5 states, computed once, read by every training run.

    store = LatentStore.create("latents.zarr", vae={"name": "wan2.1", "z_dim": 16, ...},
                               text_encoder={"name": "umt5-xxl", "max_length": 512, "dim": 4096})
                                                     # (precompute: **StoreMetadata(...).to_attrs())
    writer = store.writer(rank)                      # every precompute rank appends to its own part
    if sample_id not in store.ids():
        writer.write(Sample(id=..., bucket="81x480x832", latents=mean, text=states, text_length=n, ...))
    reader = LatentStore.open("latents.zarr")
    for bucket in reader.buckets(): sample = reader.read(bucket, 0)
    reader.metadata.vae.z_dim                        # the store's attributes, typed (store_metadata.py)

Layout (this module is the only one that knows it): buckets/<bucket>/part-<rank>/{latents, logvar?, text,
text_length, id, source, caption, fps, frame_indices, and in an image-conditioned store cond_latents, cond_mask,
clip_tokens?}, reports/rank-<r> (skipped files), one sample per chunk, shards of many samples, zstd. Each
writer has its own part (its own shards), so no two processes ever write one chunk or shard. A part's
attribute `count` moves only after a sample's arrays are written: a killed writer leaves at most one
uncommitted row, overwritten on resume, and ids already committed anywhere in the store are never written
again. bfloat16 is stored losslessly as its uint16 bits, the dtype recorded in the array's attributes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from megawan.data.store_metadata import StoreMetadata

FORMAT_VERSION = 1
SHARD_SAMPLES = 64
REPORTS = "reports"  # reports/rank-<r>: the files precompute rank r skipped, with the reason


@dataclass
class Sample:
    id: str
    bucket: str
    latents: torch.Tensor  # [z, T', H', W'] VAE mean
    text: torch.Tensor  # [L, dim] umT5 states (padded positions zero)
    text_length: int
    source: str = ""
    caption: str = ""
    fps: float = 0.0
    frame_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    logvar: Optional[torch.Tensor] = None
    # image conditioning (a store made with --conditioning; megawan.data.conditioning)
    cond_latents: Optional[torch.Tensor] = None  # [z, T', H', W'] raw VAE mean of the conditioning video
    cond_mask: Optional[torch.Tensor] = None  # uint8 [temporal stride, T']: which frames are given
    clip_tokens: Optional[torch.Tensor] = None  # [tokens, width] CLIP tokens of the given frame(s)


TENSORS = ("latents", "text", "logvar", "cond_latents", "cond_mask", "clip_tokens")  # per-sample arrays
TRAINING_TENSORS = tuple(k for k in TENSORS if k != "logvar")  # what BucketReader hands the loader


def _to_numpy(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    return t.numpy(), str(t.dtype).replace("torch.", "")


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


class LatentStore:
    def __init__(self, path: str, group):
        self.path, self.root = path, group

    # ------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, vae: dict, text_encoder: dict, **provenance) -> "LatentStore":
        """Create the store, or open it if it exists with the same VAE, text encoder and conditioning (resume)."""
        import zarr

        attrs = {"format_version": FORMAT_VERSION, "vae": vae, "text_encoder": text_encoder, **provenance}
        if os.path.exists(path):
            store = cls.open(path, mode="r+")
            for key in ("format_version", "vae", "text_encoder", "conditioning"):
                if store.root.attrs.get(key) != attrs.get(key):
                    raise ValueError(f"{path} exists with a different {key}: {store.root.attrs.get(key)} "
                                     f"!= {attrs.get(key)}; write to a new store")
            return store
        root = zarr.open_group(path, mode="w")
        root.attrs.update(attrs)
        root.create_group("buckets")
        return cls(path, root)

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "LatentStore":
        import zarr

        if not os.path.exists(path):
            raise FileNotFoundError(f"no latent store at {path}")
        root = zarr.open_group(path, mode=mode)
        if root.attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {root.attrs.get('format_version')} is not {FORMAT_VERSION}")
        return cls(path, root)

    @property
    def attrs(self) -> dict:
        """The root attributes as stored (every key, as JSON gives it back)."""
        return dict(self.root.attrs)

    @property
    def metadata(self) -> StoreMetadata:
        """The attributes, typed; StoreMetadataError (a ValueError) names a field an old or damaged store lacks."""
        return StoreMetadata.from_attrs(self.attrs, where=self.path)

    def writer(self, rank: int = 0) -> "StoreWriter":
        return StoreWriter(self, rank)

    # ------------------------------------------------------------------------------------------
    def buckets(self) -> list:
        return sorted(name for name, _ in self.root["buckets"].groups())

    def _parts(self, bucket: str) -> list:
        group = self.root["buckets"][bucket]
        return [group[name] for name in sorted(n for n, _ in group.groups())]

    def count(self, bucket: str) -> int:
        return sum(int(p.attrs.get("count", 0)) for p in self._parts(bucket))

    def ids(self, bucket: Optional[str] = None) -> list:
        names = [bucket] if bucket else self.buckets()
        out = []
        for name in names:
            for part in self._parts(name):
                n = int(part.attrs.get("count", 0))
                if n:
                    out.extend(str(i) for i in part["id"][:n])
        return out

    def bucket_path(self, bucket: str) -> str:
        """The folder holding a bucket's parts (for sizes on disk)."""
        return os.path.join(self.path, "buckets", bucket)

    def parts(self, bucket: str) -> list:
        """What each writer's part of a bucket holds: [PartInfo(path, count, latent_shape, latent_dtype)]."""
        out = []
        for part in self._parts(bucket):
            latents = part["latents"] if "latents" in part else None
            out.append(PartInfo(path=os.path.join(self.bucket_path(bucket), part.basename),
                                count=int(part.attrs.get("count", 0)),
                                latent_shape=tuple(latents.shape[1:]) if latents is not None else None,
                                latent_dtype=latents.attrs.get("dtype") if latents is not None else None))
        return out

    def locate(self, sample_id: str) -> tuple:
        """(bucket, index) of the committed sample with this id; KeyError if there is none."""
        for bucket in self.buckets():
            offset = 0
            for part in self._parts(bucket):
                n = int(part.attrs.get("count", 0))
                if n:
                    ids = [str(i) for i in part["id"][:n]]
                    if sample_id in ids:
                        return bucket, offset + ids.index(sample_id)
                offset += n
        raise KeyError(f"no sample with id {sample_id!r} in {self.path}")

    def bucket_reader(self, bucket: str, count: int) -> "BucketReader":
        return BucketReader(self, bucket, count)

    def skipped_files(self) -> list:
        """Every file any precompute rank reported as skipped: [{"id", "path", "reason"}]."""
        if REPORTS not in self.root:
            return []
        out = []
        for _, group in sorted(self.root[REPORTS].groups()):
            out.extend(group.attrs.get("skipped", []))
        return out

    def _locate(self, bucket: str, index: int):
        for part in self._parts(bucket):
            n = int(part.attrs.get("count", 0))
            if index < n:
                return part, index
            index -= n
        raise IndexError(f"bucket {bucket} has {self.count(bucket)} samples")

    def read(self, bucket: str, index: int) -> dict:
        """Sample `index` of a bucket (parts in order): tensors in their stored dtype, metadata."""
        part, i = self._locate(bucket, index)
        out = {"id": str(part["id"][i]), "source": str(part["source"][i]), "caption": str(part["caption"][i]),
               "fps": float(part["fps"][i]), "frame_indices": np.asarray(part["frame_indices"][i]),
               "text_length": int(part["text_length"][i])}
        for name in TENSORS:
            if name in part:
                out[name] = _to_torch(part[name][i], part[name].attrs["dtype"])
        return out


class BucketReader:
    """Reads what training needs of one bucket's samples by index over its parts, keeping the arrays open (the
    loader's read-ahead threads share it): latents, text, text_length, id, and the conditioning arrays where the
    store holds them."""

    def __init__(self, store: LatentStore, bucket: str, count: int):
        self.parts = []
        for part in store._parts(bucket):
            n = int(part.attrs.get("count", 0))
            if n:
                arrays = {k: part[k] for k in (*TRAINING_TENSORS, "text_length", "id") if k in part}
                self.parts.append((n, arrays, {k: part[k].attrs.get("dtype") for k in TRAINING_TENSORS if k in part}))
        total = sum(n for n, _, _ in self.parts)
        if total < count:
            raise ValueError(f"bucket {bucket} holds {total} samples, fewer than the {count} this loader's plan "
                             "was made with: the store lost samples (or this is another store)")

    def read(self, index: int) -> dict:
        """{"latents", "text", "text_length", "id"} (+ "cond_latents", "cond_mask", "clip_tokens" where stored)."""
        for n, arrays, dtypes in self.parts:
            if index < n:
                out = {k: _to_torch(arrays[k][index], dtype) for k, dtype in dtypes.items()}
                out.update(text_length=int(arrays["text_length"][index]), id=str(arrays["id"][index]))
                return out
            index -= n
        raise IndexError(index)


@dataclass
class PartInfo:
    path: str  # the part's folder
    count: int  # committed samples
    latent_shape: Optional[tuple]
    latent_dtype: Optional[str]


class StoreWriter:
    def __init__(self, store: LatentStore, rank: int):
        self.store, self.rank = store, rank
        self._parts: dict = {}
        self._report = None

    def skipped(self) -> list:
        """The files this writer's rank reported as skipped (in this run and the runs it resumes)."""
        return list(self._report_group().attrs.get("skipped", []))

    def record_skip(self, sample_id: str, path: str, reason: str) -> None:
        """Report a file that gives no sample, at once: a resumed job does not try it again."""
        group = self._report_group()
        group.attrs["skipped"] = [*group.attrs.get("skipped", []), {"id": sample_id, "path": path, "reason": reason}]

    def _report_group(self):
        if self._report is None:
            root = self.store.root
            reports = root[REPORTS] if REPORTS in root else root.create_group(REPORTS)
            name = f"rank-{self.rank:05d}"
            self._report = reports[name] if name in reports else reports.create_group(name)
        return self._report

    def _part(self, sample: Sample):
        if sample.bucket in self._parts:
            return self._parts[sample.bucket]
        import zarr

        buckets = self.store.root["buckets"]
        group = buckets[sample.bucket] if sample.bucket in buckets else buckets.create_group(sample.bucket)
        name = f"part-{self.rank:05d}"
        if name in group:
            part = group[name]
        else:
            part = group.create_group(name)
            part.attrs["count"] = 0
            zstd = zarr.codecs.ZstdCodec(level=3)

            def array(key, value, dtype_name, dtype=None):
                shape = (0, *value.shape)
                arr = part.create_array(key, shape=shape, chunks=(1, *value.shape), shards=(SHARD_SAMPLES, *value.shape),
                                        dtype=dtype or value.dtype, compressors=zstd)
                arr.attrs["dtype"] = dtype_name

            for key in TENSORS:
                tensor = getattr(sample, key)
                if tensor is not None:
                    data, dtype_name = _to_numpy(tensor)
                    array(key, data, dtype_name)
            for key, dtype in (("id", str), ("source", str), ("caption", str)):
                part.create_array(key, shape=(0,), chunks=(SHARD_SAMPLES,), dtype=dtype)
            part.create_array("text_length", shape=(0,), chunks=(SHARD_SAMPLES,), dtype="int32")
            part.create_array("fps", shape=(0,), chunks=(SHARD_SAMPLES,), dtype="float32")
            n_frames = len(sample.frame_indices)
            part.create_array("frame_indices", shape=(0, n_frames), chunks=(SHARD_SAMPLES, max(n_frames, 1)), dtype="int32")
        self._parts[sample.bucket] = part
        return part

    def write(self, sample: Sample) -> None:
        """Append one sample to this writer's part of its bucket; commit it by moving `count` last."""
        part = self._part(sample)
        n = int(part.attrs["count"])
        for key in TENSORS:
            tensor = getattr(sample, key)
            if (tensor is None) != (key not in part):
                raise ValueError(f"sample {sample.id}: '{key}' present in some samples of bucket {sample.bucket} only")
            if tensor is not None:
                data, dtype_name = _to_numpy(tensor)
                arr = part[key]
                if data.shape != arr.shape[1:] or dtype_name != arr.attrs["dtype"]:
                    raise ValueError(f"sample {sample.id}: {key} {data.shape} {dtype_name} does not fit bucket "
                                     f"{sample.bucket} ({arr.shape[1:]} {arr.attrs['dtype']})")
                if arr.shape[0] <= n:
                    arr.resize((n + 1, *arr.shape[1:]))
                arr[n] = data
        for key, value in (("id", sample.id), ("source", sample.source), ("caption", sample.caption),
                           ("text_length", sample.text_length), ("fps", sample.fps)):
            arr = part[key]
            if arr.shape[0] <= n:
                arr.resize((n + 1,))
            arr[n] = value
        frames = part["frame_indices"]
        if frames.shape[0] <= n:
            frames.resize((n + 1, frames.shape[1]))
        frames[n] = np.asarray(sample.frame_indices, dtype=np.int32)
        part.attrs["count"] = n + 1  # the commit: a sample exists once this moved
