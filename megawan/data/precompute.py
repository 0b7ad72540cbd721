"""Precompute: manifest rows -> decoded, bucketed clips -> Wan-VAE latents + umT5 states -> the Zarr store.

    job = PrecomputeJob(manifest="clips.jsonl", out="latents.zarr", vae="Wan2.1_VAE.pth", vae_config="wan2.1",
                        text_encoder="models_t5_umt5-xxl-enc-bf16.pth", text_config="umt5-xxl",
                        tokenizer="google/umt5-xxl", buckets=["video-192", "image-256"])
    summary = run_precompute(job, rank=0, world_size=1)

Every rank takes rows rank, rank + W, … of the manifest (disjoint, balanced), skips ids the store already
holds (committed by any rank, in any earlier run) or already reported as skipped, and writes to its own part
of each bucket. Decoding runs in a thread pool `prefetch` clips ahead of the encoders, so the next clips are
decoded while the current one is encoded; with DALI on the GPU, decoding, resize and crop run on the rank's GPU
and the clip reaches the VAE without visiting the host. Files that cannot give a clip are reported (id, path, reason) in
the store's `reports/rank-*` groups and in `<out>.skipped.jsonl`; they never stop the job. A killed job run
again does only what is missing, and ends with the same store as an uninterrupted run.

With `conditioning="i2v"` (or "flf2v") each clip also gets what an image-to-video model takes beside the noise
(megawan.data.conditioning): the raw VAE latents of the clip's first frame (and last) followed by zero frames,
encoded by the same VAE, and the frame mask; with `clip` (Wan2.1 I2V / FLF2V) also the CLIP image encoder's tokens
of the given frame(s). Such a store holds video buckets only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from megawan import capabilities
from megawan.artifacts import detect_clip_preset, load_clip_encoder, load_text_encoder, load_tokenizer, load_vae
from megawan.capabilities import rank_device, resolve_device
from megawan.config import ConfigError, clip_preset, text_preset
from megawan.config.vae_files import vae_config_named
from megawan.convert import load_state_dict_file
from megawan.data import dali
from megawan.data.buckets import STAGE_BUCKETS, Bucket, assign_bucket, parse_buckets, resize_center_crop
from megawan.data.conditioning import KINDS, clip_images, conditioning_video, frame_mask, given_frames
from megawan.data.decoding import DecodeError, UnsupportedCodecError, check_crop, crop_frames
from megawan.data.manifest import ManifestEntry
from megawan.data.store import LatentStore, Sample
from megawan.data.store_metadata import ConditioningMetadata, StoreMetadata, TextEncoderMetadata, VAEMetadata
from megawan.data.video import BACKENDS, decode_image, decode_video
from megawan.data.webdataset import local_copy, read_entries
from megawan.utils.progress import Progress

STORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class PrecomputeJob:
    manifest: str  # a .jsonl / .csv manifest, or WebDataset shards: "shards/{000000..000009}.tar", a .tar, a folder
    out: str
    vae: str
    text_encoder: str
    tokenizer: str
    vae_config: str = "wan2.1"  # a megawan VAE preset, or an AutoencoderKLWan config.json (an exported VAE's)
    text_config: str = "umt5-xxl"  # a megawan text-encoder preset
    buckets: list = field(default_factory=lambda: ["video-192", "image-256"])  # set names and / or "FxHxW"
    fps: float = 16.0
    dtype: str = "bfloat16"  # how latents and text states are stored
    compute_dtype: Optional[str] = None  # the encoders' dtype: float32 on CPU, bfloat16 on GPU by default
    save_logvar: bool = False
    decode_workers: int = 4
    prefetch: int = 8
    decode_backend: str = "auto"  # auto | pyav | dali-cpu | dali-gpu (megawan.data.video)
    text_cache: int = 4096  # captions repeat (templated sets, images of one video): encode each once
    conditioning: Optional[str] = None  # i2v | flf2v: also store the image conditioning (megawan.data.conditioning)
    clip: Optional[str] = None  # CLIP image encoder weights (Wan2.1 I2V / FLF2V): also store its tokens
    clip_config: Optional[str] = None  # its preset; None: the one its weights fit

    def resolved_buckets(self) -> list:
        spec = []
        for item in self.buckets:
            spec += STAGE_BUCKETS[item] if item in STAGE_BUCKETS else [item]
        return parse_buckets(spec)

    def vae_cfg(self):
        """The VAEConfig `vae_config` names: a preset, or a config.json whose latent statistics the store records."""
        return vae_config_named(self.vae_config, "PrecomputeJob.vae_config (--vae-config)")

    def check(self) -> None:
        """Refuse what cannot run on this machine, in one line naming the option, before any work starts."""
        self.vae_cfg()
        backend, option = self.decode_backend, "PrecomputeJob.decode_backend (--decode-backend)"
        if backend not in BACKENDS:
            raise ConfigError(f"{option}: unknown {backend!r}; use one of {' | '.join(BACKENDS)}")
        if backend == "dali-gpu" and not capabilities.cuda_available():
            raise ConfigError(f"{option}: dali-gpu decodes with NVDEC on a CUDA device and this machine has none; "
                              "use dali-cpu (VP8 / VP9 / MJPEG) or pyav (every codec)")
        if backend.startswith("dali-") and not dali.dali_available():
            raise ConfigError(f"{option}: {backend} needs NVIDIA DALI, which does not import here "
                              "(pip install nvidia-dali-cuda120); use pyav")
        buckets = self.resolved_buckets()
        if self.clip is not None and self.conditioning is None:
            raise ConfigError("PrecomputeJob.clip (--clip): CLIP tokens are part of the image conditioning; give "
                              "--conditioning i2v | flf2v too")
        if self.conditioning is not None:
            option = "PrecomputeJob.conditioning (--conditioning)"
            if self.conditioning not in KINDS:
                raise ConfigError(f"{option}: unknown {self.conditioning!r}; use one of {' | '.join(KINDS)}")
            images = [b.name for b in buckets if b.is_image]
            if images:
                raise ConfigError(
                    f"PrecomputeJob.buckets (--stage-buckets): {', '.join(images)} is an image bucket, and an "
                    f"image-conditioned store (--conditioning {self.conditioning}) holds videos only: a 1-frame "
                    "sample would be its own condition. Give video buckets only (images in the manifest are then "
                    "reported as skipped)")


@dataclass
class Prepared:
    entry: ManifestEntry
    bucket: Optional[Bucket] = None
    video: Optional[torch.Tensor] = None  # float32 [3, T, H, W] in [-1, 1]; on the GPU when DALI decoded it there
    frame_indices: Optional[np.ndarray] = None
    skip_reason: Optional[str] = None


def prepare(entry: ManifestEntry, buckets: list, fps: float, decode_backend: str = "auto",
            device_id: Optional[int] = None) -> Prepared:
    """Decode one manifest row, pick its bucket, resize + crop. A bad file gives skip_reason, never raises.
    A WebDataset shard's member is decoded from a temporary copy (megawan.data.webdataset.local_copy); a shard
    sample without a caption or a video (`entry.problem`) is skipped with that reason. See `_prepare_file`."""
    if entry.problem is not None:
        return Prepared(entry, skip_reason=entry.problem)
    try:
        with local_copy(entry.path) as path:
            item = _prepare_file(entry if path == entry.path else replace(entry, path=path), buckets, fps,
                                 decode_backend, device_id)
    except DecodeError as e:
        return Prepared(entry, skip_reason=e.reason)
    item.entry = entry  # the entry's own path (`<shard>.tar/<member>`) in the store and the skip report
    return item


def _prepare_file(entry: ManifestEntry, buckets: list, fps: float, decode_backend: str,
                  device_id: Optional[int]) -> Prepared:
    """One row whose path is a file.

    A video goes through DALI on the GPU with decode_backend "dali-gpu", or "auto" where CUDA and DALI are there
    (a codec NVDEC refuses then falls back to PyAV): decoded, resized and cropped on GPU `device_id` (by default
    the calling thread's current one), `video` a CUDA tensor. Otherwise decoded on the CPU (PyAV, or DALI's CPU
    decoder) and resized there by `resize_center_crop`. Both use `buckets.cover_crop`'s geometry. A row's `crop`
    box (a letterbox's picture) is cut from the decoded frames first, on the same device: the bucket is chosen
    from the box's size; a box past the frame skips the row."""
    on_gpu = decode_backend == "dali-gpu" or (decode_backend == "auto" and capabilities.cuda_available()
                                              and dali.dali_available())
    try:
        if entry.is_image:
            frames = decode_image(entry.path)
            rate, first = 0.0, 0
        else:
            rate = entry.fps or fps
            longest = max((b.frames for b in buckets if not b.is_image), default=1)
            start = entry.start or 0.0
            # never decode more of a long video than a bucket can use; a shorter one gives the frames it has
            # (decoding.available_frames) and goes to a bucket it fills, or is skipped as too short
            end = start + longest / rate + 1e-6
            if entry.end is not None:
                end = min(end, entry.end)
            first = int(round(start * rate))
            if on_gpu:
                try:
                    return _prepare_on_gpu(entry, buckets, rate, end, first, device_id)
                except UnsupportedCodecError:
                    if decode_backend == "dali-gpu":
                        raise
                    decode_backend = "pyav"  # a codec NVDEC does not take (e.g. ProRes): FFmpeg reads it
            kwargs = {"backend": decode_backend} if decode_backend != "auto" else {}
            frames = decode_video(entry.path, fps=rate, start=entry.start, end=end, **kwargs)
        frames = crop_frames(frames, entry.crop, entry.path)  # a letterbox's picture: its size picks the bucket
    except DecodeError as e:
        return Prepared(entry, skip_reason=e.reason)
    except (ImportError, NameError, AttributeError, TypeError):
        raise  # our bug or a broken install, not a bad file: skipping every clip would hide it
    except Exception as e:  # a decoder library choking on one odd file must not end a million-clip job
        return Prepared(entry, skip_reason=f"decoder failed ({type(e).__name__}: {e})")
    t, h, w = frames.shape[:3]  # t: the frames the clip really has at `rate` (decoding.available_frames)
    bucket = assign_bucket(buckets, frames=t, height=h, width=w)
    if bucket is None:
        return Prepared(entry, skip_reason=_no_bucket(buckets, entry.is_image, t, rate))
    video = resize_center_crop(frames[: bucket.frames], bucket.height, bucket.width)
    return Prepared(entry, bucket, video, _clip_indices(first, bucket))


def _prepare_on_gpu(entry: ManifestEntry, buckets: list, rate: float, end: float, first: int,
                    device_id: Optional[int]) -> Prepared:
    """The frames chosen from the container (nothing decoded yet), the bucket from their count and size, then
    only the bucket's frames decoded, resized and cropped by DALI on the GPU."""
    clip = dali.select_frames(entry.path, fps=rate, start=entry.start, end=end, device="gpu")
    height, width = check_crop(entry.crop, clip.height, clip.width, entry.path)  # the box's size, when a row has one
    bucket = assign_bucket(buckets, frames=len(clip.frames), height=height, width=width)
    if bucket is None:
        return Prepared(entry, skip_reason=_no_bucket(buckets, False, len(clip.frames), rate))
    video = dali.decode_clip_dali(entry.path, clip._replace(frames=clip.frames[: bucket.frames]), bucket.height,
                                  bucket.width, device="gpu", device_id=device_id, crop=entry.crop)
    return Prepared(entry, bucket, video, _clip_indices(first, bucket))


def _no_bucket(buckets: list, is_image: bool, frames: int, rate: float) -> str:
    """Why `assign_bucket` found none: a clip never goes into a bucket longer than it (no padded frames)."""
    if is_image:
        return "an image, and the bucket set has no image bucket"
    video_lengths = [b.frames for b in buckets if not b.is_image]
    if frames > 1 and not video_lengths:
        return f"a video ({frames} frames at {rate:g} fps), and the bucket set has no video bucket"
    plural = "" if frames == 1 else "s"
    return (f"too short for any bucket ({frames} frame{plural}) at {rate:g} fps: the shortest video bucket has "
            f"{min(video_lengths, default=1)}")


def _clip_indices(first: int, bucket: Bucket) -> np.ndarray:
    """Frame k of the clip is at time k / fps of the source: indices on the sampling grid (fps stored beside)."""
    return np.arange(first, first + bucket.frames, dtype=np.int32)


def fingerprint(state_dict: dict) -> str:
    """A cheap identity for weights (names, shapes and the first values of each tensor): a store refuses to be
    resumed with different encoders, wherever their files moved."""
    h = hashlib.sha256()
    for key in sorted(k for k, v in state_dict.items() if isinstance(v, torch.Tensor)):
        t = state_dict[key]
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Encoders:
    """The Wan-VAE, the umT5 encoder and its tokenizer (and the CLIP image encoder when given), loaded once per
    rank."""

    def __init__(self, job: PrecomputeJob, device: torch.device):
        default = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = STORE_DTYPES[job.compute_dtype] if job.compute_dtype else default
        self.device, self.dtype = device, dtype
        self.vae_config, self.text_config = job.vae_cfg(), text_preset(job.text_config)
        self.vae = load_vae(job.vae, self.vae_config, device=device, dtype=dtype)
        self.text = load_text_encoder(job.text_encoder, self.text_config, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(job.tokenizer, max_length=self.text_config.text_len)
        self.store_dtype = STORE_DTYPES[job.dtype]
        self._cache: dict = {}
        self._cache_size = job.text_cache
        c = self.vae_config
        self.vae_metadata = VAEMetadata(name=c.name, z_dim=c.z_dim,
                                        stride=(c.temporal_stride, c.spatial_stride, c.spatial_stride),
                                        latents_mean=tuple(c.latents_mean), latents_std=tuple(c.latents_std),
                                        weights=fingerprint(self.vae.state_dict()), normalized=False)
        t = self.text_config
        pieces = [len(self.tokenizer.sp.id_to_piece(i)) for i in range(self.tokenizer.sp.get_piece_size())]
        self.text_metadata = TextEncoderMetadata(name=t.name, max_length=t.text_len, dim=t.d_model,
                                                 weights=fingerprint(self.text.state_dict()),
                                                 tokenizer=fingerprint({"pieces": torch.tensor(pieces)}))
        self.conditioning, self.clip = job.conditioning, None
        self.conditioning_metadata = None
        if job.clip is not None:
            name = job.clip_config or detect_clip_preset(load_state_dict_file(job.clip, mmap=True), job.clip)
            self.clip = load_clip_encoder(job.clip, clip_preset(name), device=device, dtype=dtype)
        if job.conditioning is not None:
            clip = {}
            if self.clip is not None:
                k = self.clip.clip_config
                clip = dict(clip=k.name, clip_weights=fingerprint(self.clip.state_dict()), clip_width=k.hidden_size,
                            clip_tokens=len(given_frames(job.conditioning, 2)) * k.num_tokens)
            self.conditioning_metadata = ConditioningMetadata(kind=job.conditioning, mask_channels=c.temporal_stride,
                                                              **clip)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> tuple:
        """[3, T, H, W] -> raw latent mean and log-variance [z, T', H', W'] (store dtype)."""
        mean, logvar = self.vae.encode(video[None].to(self.device, self.dtype))
        return mean[0].to(self.store_dtype).cpu(), logvar[0].to(self.store_dtype).cpu()

    @torch.no_grad()
    def encode_conditioning(self, video: torch.Tensor) -> dict:
        """The clip's image conditioning as Wan computes it at sampling time (megawan.data.conditioning):
        {"cond_latents": the raw VAE mean of [given frame(s), zeros] [z, T', H', W'] (store dtype),
        "cond_mask": uint8 [temporal stride, T']} and with a CLIP encoder "clip_tokens": the penultimate block's
        states of the given frame(s) after Wan's CLIP preprocessing, [tokens, width] (FLF2V: the first frame's
        tokens, then the last frame's)."""
        kind = self.conditioning
        mean, _ = self.vae.encode(conditioning_video(video, kind)[None].to(self.device, self.dtype))
        out = {"cond_latents": mean[0].to(self.store_dtype).cpu(),
               "cond_mask": frame_mask(kind, video.shape[1], self.vae_config.temporal_stride)}
        if self.clip is not None:
            tokens = self.clip(self.clip.preprocess(clip_images(video, kind).to(self.device)))  # [n, L, width]
            out["clip_tokens"] = tokens.reshape(-1, tokens.shape[-1]).to(self.store_dtype).cpu()
        return out

    @torch.no_grad()
    def encode_text(self, caption: str) -> tuple:
        """-> (states [text_len, dim] zero past the caption, its token count)."""
        if caption in self._cache:
            return self._cache[caption]
        ids, mask = self.tokenizer([caption])
        states = self.text(ids.to(self.device), mask.to(self.device))[0].to(self.store_dtype).cpu()
        out = (states, int(mask.sum()))
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[caption] = out
        return out


def decode_device_id(device: torch.device) -> Optional[int]:
    """The GPU that DALI decodes this rank's clips on: the encoders' (this rank's, from LOCAL_RANK), so the frames
    never cross GPUs; None for CPU encoders. Named here in the rank's main thread: the decoding threads' own
    current CUDA device is cuda:0 whatever `torch.cuda.set_device` said in this one."""
    if device.type != "cuda":
        return None
    return rank_device().index if device.index is None else device.index


def run_precompute(job: PrecomputeJob, rank: int = 0, world_size: int = 1, barrier=None, device=None,
                   progress: bool = True) -> dict:
    """This rank's share of the job. `barrier()` (torch.distributed's on many ranks) orders store creation."""
    job.check()  # before anything loads: a backend this machine cannot run fails in one line
    barrier = barrier or (lambda: None)
    device = resolve_device(device)  # None: this rank's (the GPU initialize() gave it, else the CPU)
    decode_gpu = decode_device_id(device)
    entries = read_entries(job.manifest)  # a manifest file or WebDataset shards, the same list on every rank
    buckets = job.resolved_buckets()
    encoders = Encoders(job, device)
    metadata = StoreMetadata(vae=encoders.vae_metadata, text_encoder=encoders.text_metadata,
                             buckets=tuple(b.name for b in buckets), fps=job.fps, dtype=job.dtype,
                             logvar=job.save_logvar, manifest=os.path.abspath(job.manifest),
                             conditioning=encoders.conditioning_metadata)
    if rank == 0:
        LatentStore.create(job.out, **metadata.to_attrs())
    barrier()
    store = LatentStore.create(job.out, **metadata.to_attrs())
    done = set(store.ids()) | {s["id"] for s in store.skipped_files()}
    mine = [e for e in entries[rank::world_size] if e.id not in done]

    writer = store.writer(rank)
    skipped_before = skipped = len(writer.skipped())
    written, start = 0, time.perf_counter()
    bar = Progress(len(mine), desc=f"precompute [rank {rank}]", unit="clips", enabled=progress)
    with ThreadPoolExecutor(max_workers=max(job.decode_workers, 1)) as pool:
        pending = [pool.submit(prepare, e, buckets, job.fps, job.decode_backend, decode_gpu)
                   for e in mine[: job.prefetch]]
        for i in range(len(mine)):
            item = pending.pop(0).result()
            if i + job.prefetch < len(mine):  # keep the decoders `prefetch` clips ahead of the encoders
                pending.append(pool.submit(prepare, mine[i + job.prefetch], buckets, job.fps, job.decode_backend,
                                           decode_gpu))
            e = item.entry
            if item.skip_reason is not None:
                writer.record_skip(e.id, e.path, item.skip_reason)  # at once: a resumed job does not retry it
                skipped += 1
            else:
                mean, logvar = encoders.encode_video(item.video)
                text, length = encoders.encode_text(e.caption)
                condition = encoders.encode_conditioning(item.video) if job.conditioning else {}
                writer.write(Sample(id=e.id, bucket=item.bucket.name, latents=mean, text=text, text_length=length,
                                    source=e.path, caption=e.caption, fps=0.0 if e.is_image else (e.fps or job.fps),
                                    frame_indices=item.frame_indices,
                                    logvar=logvar if job.save_logvar else None, **condition))
                written += 1
            bar.update(1, skipped=skipped)
    bar.close()
    elapsed = time.perf_counter() - start
    barrier()
    summary = {"rank": rank, "written": written, "skipped_now": skipped - skipped_before,
               "already_done": len(entries[rank::world_size]) - len(mine), "seconds": elapsed,
               "clips_per_s": written / elapsed if elapsed > 0 else 0.0}
    if rank == 0:
        final = LatentStore.open(job.out)
        every_skip = final.skipped_files()
        with open(job.out.rstrip("/") + ".skipped.jsonl", "w", encoding="utf-8") as f:
            for row in every_skip:
                f.write(json.dumps(row) + "\n")
        summary["store"] = {b: final.count(b) for b in final.buckets()}
        summary["skipped"] = every_skip
    return summary
