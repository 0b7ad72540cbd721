"""In-loop validation of `megawan train-vae`: every validation.every steps, the held-out clips of each bucket are
reconstructed through the posterior mean and measured as tools/eval_vae.py measures them
(megawan.models.vae.scores.evaluate_vae): PSNR, SSIM and LPIPS when its weights are set (loss.lpips_vgg /
lpips_lin); rank 0 writes a side-by-side strip per bucket (original |
reconstruction, the first samples' middle frames) for the trackers.

    validator = VAEValidator(cfg, vae, lpips, device, dtype, stride, out_dir)
    values = validator.run(step)     # {"val/psnr", "val/ssim", ["val/lpips"], "val/<bucket>/psnr", ..., "val/seconds"}
    images = validator.media(step)   # [(tag, png path, caption)]

Every rank computes the same numbers (the held-out batch is the same on each: the work is a few clips); the
weights are those of the moment (the EMA's when the trainer applied it).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from megawan.config.vae_run import VAERunConfig
from megawan.models.vae.scores import evaluate_vae
from megawan.utils.media import write_image

STRIP_SAMPLES = 4  # samples per strip


def _pixels(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class VAEValidator:
    def __init__(self, cfg: VAERunConfig, vae, lpips, device, dtype, stride, out_dir: str):
        from megawan.data.pixel_loader import PixelLoader

        v = cfg.validation
        self.vae, self.lpips, self.device, self.dtype, self.out_dir = vae, lpips, device, dtype, out_dir
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.batches = {}
        for bucket in v.buckets or cfg.data.buckets:  # the same held-out samples every time, on every rank
            loader = PixelLoader(v.manifest, buckets=[bucket], global_batch_size=1, seed=cfg.train.seed,
                                 dp_rank=0, dp_size=1, num_workers=0, fps=cfg.data.fps, decode=cfg.data.decode,
                                 random_crop=False, stride=stride, verbose=False)
            held = loader.held_out(per_bucket=v.samples)  # centre crops, each sample once (a batch would repeat
            self.batches[bucket] = torch.stack([h["video"] for h in held])  # a bucket smaller than v.samples)
        self._media = []

    @torch.no_grad()
    def run(self, step: int) -> dict:
        """Scores of the held-out batches (megawan.models.vae.scores.evaluate_vae: what tools/eval_vae.py reports)."""
        start = time.perf_counter()
        was_training = self.vae.training
        self.vae.eval()
        values, rows, self._media = {}, [], []
        for bucket, video in self.batches.items():
            result = evaluate_vae(self.vae, [{"video": video, "bucket": bucket}], lpips=self.lpips,
                                  keep=STRIP_SAMPLES if self.rank == 0 else 0)
            for name, value in result["buckets"][bucket].items():
                if name != "samples":
                    values[f"val/{bucket}/{name}"] = value
            rows += result["samples"]
            if self.rank == 0:
                self._media.append(self._strip(step, bucket, video, torch.stack(result["reconstructions"])))
        self.vae.train(was_training)
        for name in ("psnr", "ssim", "lpips"):
            if name in rows[0]:
                values[f"val/{name}"] = sum(r[name] for r in rows) / len(rows)
        values["val/seconds"] = time.perf_counter() - start
        return values

    def _strip(self, step: int, bucket: str, x: torch.Tensor, x_hat: torch.Tensor) -> tuple:
        """Originals on the top row, reconstructions below (middle frame of each clip)."""
        n, t = min(STRIP_SAMPLES, x.shape[0]), x.shape[2] // 2
        top = np.concatenate([_pixels(x[i, :, t]) for i in range(n)], axis=1)
        bottom = np.concatenate([_pixels(x_hat[i, :, t]) for i in range(n)], axis=1)
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"step{step:07d}_{bucket}.png")
        write_image(path, np.concatenate([top, bottom], axis=0))
        return f"val/{bucket}", path, f"step {step}: original (top) | reconstruction (bottom), frame {t}"

    def media(self, step: int) -> list:
        return list(self._media)
