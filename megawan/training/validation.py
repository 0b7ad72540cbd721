"""Validation during training: held-out loss at fixed flow times, and videos sampled for held-out prompts.

Every rank takes part, in the run's own layout. Model replicas (DP ranks) split the held-out samples and
the prompts; inside a replica the model runs through megatron's forward-only schedule (PP stages, TP, CP
exactly as in training) and the last pipeline stage broadcasts each velocity to its stage peers, so every
rank advances the same latents with the same sampler. Every replica does the same amount of work (padded
with weight-0 copies) and the only collectives spanning replicas are the final loss all-reduce and one
barrier, so no rank waits on another for longer than one replica's share.

The replica's leader (last stage, TP rank 0, CP rank 0) decodes its latents with the VAE and writes
<dir>/step-NNNNNNN/<id>.mp4 (clips, each with an animated <id>.webp preview) or <id>.png (stills), a strip of
frames per prompt (<id>.strip.png, small frames enlarged) and its rows of samples.jsonl; rank 0 stacks the
strips into contact_sheet.png, each prompt's caption left of its row. `media(step)` names these files for the
trackers (megawan.training.metrics.MetricsLogger.log_media). The unconditional pass of
classifier-free guidance uses zero text states: the null condition `train.text_dropout` trains. Wan2.2 TI2V's
held-out loss is image-to-video on clips (first latent frame clean, out of the loss) and text-to-image on stills,
the same on every validation; its samples are text-to-video.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from PIL import Image

from megawan.config import DiTConfig, ValidationConfig
from megawan.config.vae_files import vae_config_named
from megawan.data.buckets import Bucket
from megawan.data.store import LatentStore
from megawan.diffusion.flow import FlowMatching
from megawan.diffusion.samplers import make_sampler, sample
from megawan.artifacts import load_vae
from megawan.training.conditioning import image_for_model, image_inputs
from megawan.training.schedule import forward_backward
from megawan.utils.images import captioned_rows, contact_sheet, video_to_uint8
from megawan.utils.media import media_suffix, preview_path, read_media, write_media


CONTACT_SHEET = "contact_sheet.png"
STRIP_MIN_HEIGHT = 128  # a strip's frames are at least this high (tiny frames enlarged, nearest neighbour)


def _noise(seed: int, key: str, shape) -> torch.Tensor:
    """Fixed noise per (seed, sample): the same in every layout and at every validation."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode())))


class Validator:
    """Held-out loss and samples for the model being trained, in its layout (megatron's parallel state, set up
    by the trainer, says which replica and stage this rank is).

    settings: the run's `validation` section (held-out store, VAE, sampler, …); chunks: the DDP-wrapped model
    chunks of this rank; model: the DiT's config (patch size, model type, image branch); micro_batch_size:
    held-out samples per forward;
    device, dtype: where and in which dtype the model runs; normalization: (mean, std) [1, z, 1, 1, 1], the
    latent statistics the model is trained with; ema: the trainer's EMA (swapped in when settings.use_ema);
    out_dir: where each validation step's folder goes.
    """

    def __init__(self, settings: ValidationConfig, chunks: list, *, model: DiTConfig, micro_batch_size: int,
                 device: torch.device, dtype: torch.dtype, normalization: tuple, out_dir: str, ema=None):
        self.cfg, self.chunks, self.ema = settings, chunks, ema
        self.model, self.micro_batch_size = model, micro_batch_size
        self.patch_size, self.ti2v = tuple(model.patch_size), model.model_type == "ti2v"
        self.device, self.dtype = device, dtype
        self.latents_mean, self.latents_std = normalization
        self.store = LatentStore.open(self.cfg.store)
        self.out_dir = out_dir
        self._vae = None
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.leader = (self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0
                       and ps.get_context_parallel_rank() == 0)

    # ------------------------------------------------------------------------------------------
    def run(self, step: int) -> dict:
        start = time.perf_counter()
        ema = self.ema if self.cfg.use_ema else None
        if ema is not None:
            ema.apply()
        try:
            metrics = self._loss()
            if self.cfg.num_samples:
                metrics.update(self._samples(step))
        finally:
            if ema is not None:
                ema.restore()
        metrics["val/seconds"] = time.perf_counter() - start
        return metrics

    # ------------------------------------------------------------------------------------------
    def _forward(self, x, timestep, text, capture=None, target=None, weight=None, mask=None, image=None):
        """One forward-only pass of the replica. With `capture`, returns the velocity on every rank of the
        replica; else the weighted squared error summed on the last stage (0 elsewhere). Results stay on the
        rank's device: the sampler steps there, and the loss sums come back to the host once per validation."""
        pt, ph, pw = self.patch_size
        tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        out = {}
        batch = {"x": x.to(self.device, self.dtype), "t": timestep.to(self.device),
                 "text": text.to(self.device, self.dtype), "image": image}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb["x"], mb["t"], mb["text"], image=mb["image"])

            def loss_fn(prediction):
                if capture:
                    out["v"] = prediction.detach().float()
                    return prediction.float().sum() * 0, {}
                on = prediction.device
                per_sample = FlowMatching.per_sample_loss(prediction, target.to(on),
                                                          None if mask is None else mask.to(on))
                out["sum"] = (per_sample * weight.to(on)).sum()
                return per_sample.sum() * 0, {}

            return output, loss_fn

        with torch.no_grad():
            forward_backward(self.chunks, forward_step, [iter([batch]) for _ in self.chunks], 1, tokens, x.shape[0],
                             forward_only=True)
        if not capture:
            return out.get("sum", 0.0)
        v = out.get("v")
        if self.pp_size > 1:
            if v is None:  # the velocity has the latents' channels (an i2v input also holds its conditioning)
                v = torch.empty(x.shape[0], self.model.out_dim, *x.shape[2:], dtype=torch.float32,
                                device=self.device)
            dist.broadcast(v, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return v

    def _share(self, n: int) -> list:
        """This replica's indices of 0..n-1 (round robin), padded with None to the same count on every replica."""
        mine = list(range(self.dp_rank, n, self.dp_size))
        return mine + [None] * (math.ceil(n / self.dp_size) - len(mine))

    def _read(self, bucket: str, indices: list) -> list:
        rows = [self.store.read(bucket, i if i is not None else 0) for i in indices]
        for row, i in zip(rows, indices):
            row["weight"] = 0.0 if i is None else 1.0
        return rows

    # ------------------------------------------------------------------------------------------
    def _loss(self) -> dict:
        """Mean flow-matching loss over the held-out samples at each fixed flow time (unshifted), with noise
        fixed per sample, so the numbers of two validations differ only by the weights."""
        cfg = self.cfg
        times = list(cfg.loss_timesteps)
        sums, count = torch.zeros(len(times), dtype=torch.float64, device=self.device), 0  # NCCL: device tensors
        mbs = self.micro_batch_size
        for bucket in self.store.buckets():
            n = self.store.count(bucket)
            n = min(n, cfg.loss_samples) if cfg.loss_samples else n
            if n == 0:
                continue
            count += n
            share = self._share(n)
            for s in range(0, len(share), mbs):
                rows = self._read(bucket, share[s:s + mbs])
                x0 = (torch.stack([r["latents"].float() for r in rows]) - self.latents_mean) / self.latents_std
                noise = torch.stack([_noise(cfg.seed, f"loss/{r['id']}", x0.shape[1:]) for r in rows])
                # to the device once for all flow times (noise is drawn on the host: the same in any layout)
                x0, noise = x0.to(self.device), noise.to(self.device)
                text = torch.stack([r["text"] for r in rows])
                weight = torch.tensor([r["weight"] for r in rows], device=self.device)
                condition, image = self._image_inputs(rows)
                for k, flow_time in enumerate(times):
                    tt = torch.full((x0.shape[0],), flow_time, device=self.device)
                    if self.ti2v:  # videos as image-to-video; an image (one latent frame) as text-to-image
                        clean = torch.full((x0.shape[0],), x0.shape[2] > 1)
                        x_t, target, timestep, mask = FlowMatching.clean_first_frame(x0, noise, tt, self.patch_size,
                                                                                     clean)
                    else:
                        (x_t, target), timestep, mask = FlowMatching.noised(x0, noise, tt), tt * 1000, None
                    if condition is not None:  # i2v: the model sees [x_t, mask, conditioning latents]
                        x_t = torch.cat([x_t, condition], dim=1)
                    value = self._forward(x_t, timestep, text, target=target, weight=weight, mask=mask, image=image)
                    if self.leader:
                        sums[k] += value
        dist.all_reduce(sums)
        out = {f"val/loss_t{flow_time:.2f}": (sums[k] / max(count, 1)).item() for k, flow_time in enumerate(times)}
        out["val/loss"] = (sums.sum() / max(count, 1) / len(times)).item()
        return out

    # ------------------------------------------------------------------------------------------
    def _bucket(self) -> str:
        if self.cfg.bucket:
            return self.cfg.bucket
        buckets = self.store.buckets()
        videos = [b for b in buckets if not Bucket.from_name(b).is_image]
        return (videos or buckets)[0]

    def _samples(self, step: int) -> dict:
        """Sample the held-out prompts of one bucket; leaders decode and write them; rank 0 makes the sheet."""
        cfg = self.cfg
        bucket = self._bucket()
        n = min(cfg.num_samples, self.store.count(bucket))
        share = self._share(n)
        folder = os.path.join(self.out_dir, f"step-{step:07d}")
        if self.leader:
            os.makedirs(folder, exist_ok=True)
        written = []
        for s in range(0, len(share), cfg.batch_size):
            rows = self._read(bucket, share[s:s + cfg.batch_size])
            text = torch.stack([r["text"] for r in rows]).to(self.device)
            noise = torch.stack([_noise(cfg.seed, f"sample/{r['id']}", r["latents"].shape) for r in rows])
            noise = noise.to(self.device)  # the sampler's latents stay on the device until they are written
            guided = cfg.guidance != 1.0
            text_in = torch.cat([text, torch.zeros_like(text)]) if guided else text
            velocity, pin = self._velocity(rows, text_in, guided)
            latents = sample(velocity, noise, make_sampler(cfg.sampler, cfg.steps, cfg.shift), guidance=cfg.guidance,
                             pin=pin)
            if self.leader:
                written += self._write(folder, rows, latents)
        rows_file = os.path.join(folder, f"samples-rank{dist.get_rank():05d}.jsonl")
        if self.leader:
            with open(rows_file, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(w) + "\n" for w in written)
        dist.barrier()
        if dist.get_rank() == 0:
            merge_samples(folder)
        return {"val/samples": n}

    def _image_inputs(self, rows: list) -> tuple:
        """An i2v model's inputs beside the noise for these held-out rows: (condition [n, mask + z, T', H', W'] on
        the device, CLIP tokens as the DiT takes them or None); (None, None) for other models."""
        if self.model.model_type != "i2v":
            return None, None
        batch = {k: torch.stack([r[k] for r in rows]) for k in ("cond_latents", "cond_mask", "clip_tokens")
                 if k in rows[0]}
        condition, tokens = image_inputs(batch, self.model, len(rows), self.latents_mean, self.latents_std)
        return condition.to(self.device), image_for_model(tokens, slice(None), self.model, self.device, self.dtype)

    def _velocity(self, rows: list, text_in: torch.Tensor, guided: bool) -> tuple:
        """(velocity(x, timestep) for the sampler, pin or None) for these held-out rows. i2v: the stored
        conditioning beside the noise (the same for the conditional and unconditional halves of guidance, as
        the official pipelines); TI2V clips: the held-out clip's first latent frame pinned clean, its tokens at
        timestep 0 (image-to-video, as `megawan generate --image`); otherwise text only."""
        halves = 2 if guided else 1
        condition, image = self._image_inputs(rows)
        if condition is not None:
            condition = torch.cat([condition] * halves)
            image = None if image is None else torch.cat([image] * halves)
            return (lambda x, timestep: self._forward(torch.cat([x, condition], dim=1), timestep, text_in,
                                                       capture=True, image=image)), None
        frames = rows[0]["latents"].shape[1]
        if not self.ti2v or frames == 1:
            return (lambda x, timestep: self._forward(x, timestep, text_in, capture=True)), None
        first = torch.stack([r["latents"][:, :1].float() for r in rows])
        first = ((first - self.latents_mean) / self.latents_std).to(self.device)
        pin, timesteps = FlowMatching.clean_first_frame_sampling(first, rows[0]["latents"].shape[1:], self.patch_size)
        return (lambda x, timestep: self._forward(x, timesteps(timestep), text_in, capture=True)), pin

    def _vae_model(self):
        if self._vae is None:
            name = self.cfg.vae_config or self.store.metadata.vae.name
            config = vae_config_named(name, "validation.vae_config")  # a preset, or a trained VAE's config.json
            self._vae = load_vae(self.cfg.vae, config, device=self.device).eval()
        return self._vae

    def _write(self, folder: str, rows: list, latents: torch.Tensor) -> list:
        out = []
        keep = [i for i, r in enumerate(rows) if r["weight"] > 0]
        if not keep:
            return out
        if self.cfg.vae:
            vae = self._vae_model()
            with torch.no_grad():
                video = vae.decode(vae.denormalize(latents[keep].to(self.device)))  # the VAE's raw latents
        for j, i in enumerate(keep):
            r = rows[i]
            record = {"id": r["id"], "caption": r["caption"]}
            torch.save(latents[i].cpu().clone(), os.path.join(folder, f"{r['id']}.latents.pt"))
            record["latents"] = f"{r['id']}.latents.pt"
            if self.cfg.vae:
                frames = video_to_uint8(video[j])
                name = r["id"] + media_suffix(frames.shape[0])
                write_media(os.path.join(folder, name), frames, fps=self.cfg.fps)
                record["video" if frames.shape[0] > 1 else "image"] = name
                if frames.shape[0] > 1:  # write_media's animated preview beside the mp4
                    record["preview"] = os.path.basename(preview_path(name))
                strip = contact_sheet(frames, max_frames=8, gap=2, min_height=STRIP_MIN_HEIGHT)
                strip.save(os.path.join(folder, f"{r['id']}.strip.png"))
                record["strip"] = f"{r['id']}.strip.png"
            out.append(record)
        return out

    def media(self, step: int) -> dict:
        """The pictures validation wrote at `step`, as MetricsLogger.log_media takes them: {"videos": [(tag,
        mp4, caption)], "images": [(tag, png, caption or None)]}: each held-out prompt's clip (or still) and the
        contact sheet. Rank 0 only (the one that merged the step's rows); empty elsewhere and without a VAE."""
        folder = os.path.join(self.out_dir, f"step-{step:07d}")
        if dist.get_rank() != 0 or not os.path.exists(os.path.join(folder, "samples.jsonl")):
            return {"videos": [], "images": []}
        return media_of(folder)


def merge_samples(folder: str) -> None:
    """Rank 0, once every leader has written: the leaders' rows (samples-rankNNNNN.jsonl) become samples.jsonl,
    sorted by id, and their strips one contact_sheet.png, each prompt's caption left of its row."""
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("samples-rank") and name.endswith(".jsonl"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
            os.remove(os.path.join(folder, name))
    rows.sort(key=lambda r: r["id"])
    with open(os.path.join(folder, "samples.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    strips = [(r["caption"], Image.open(os.path.join(folder, r["strip"]))) for r in rows if "strip" in r]
    if strips:
        captioned_rows(strips).save(os.path.join(folder, CONTACT_SHEET))


def media_of(folder: str) -> dict:
    """The pictures of one validation step folder (see Validator.media): tags val/video/<id>, val/image/<id>
    (stills) and val/contact_sheet."""
    rows = read_samples(folder)
    videos = [(f"val/video/{r['id']}", r["video"], r["caption"]) for r in rows if "video" in r]
    images = [(f"val/image/{r['id']}", r["image"], r["caption"]) for r in rows if "image" in r]
    sheet = os.path.join(folder, CONTACT_SHEET)
    if os.path.exists(sheet):
        images.append(("val/contact_sheet", sheet, None))
    return {"videos": videos, "images": images}


def read_samples(folder: str) -> list:
    """The rows of a validation step's samples.jsonl, paths made absolute."""
    with open(os.path.join(folder, "samples.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        for key in ("latents", "video", "image", "preview", "strip"):
            if key in r:
                r[key] = os.path.join(folder, r[key])
    return rows


def frames_of(row: dict) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of a sampled row (its mp4 or png)."""
    return read_media(row["video"] if "video" in row else row["image"])
