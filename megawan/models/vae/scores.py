"""How well a VAE reconstructs: PSNR, SSIM and (given the network) LPIPS of decode(posterior mean), per bucket
(resolution x length) and overall. Below the training layer, so that a training loop's validation
(megawan.training) and `tools/eval_vae.py` (megawan.vae_eval, several VAEs side by side) score alike.

    result = evaluate_vae(vae, [{"video": clip, "bucket": "17x256x256", "id": "a"}, ...], lpips=net)
    result["buckets"]["17x256x256"]   # {"psnr": dB, "ssim": ..., "lpips": ..., "samples": n}; result["overall"] alike

PSNR and SSIM (megawan.utils.video_metrics) are on [-1, 1] pixels (data range 2), per frame and averaged over the
clip's frames; LPIPS (megawan.models.vae.lpips, VGG "lin" v0.1) per frame, averaged alike. A bucket's number is the
mean over its samples; "overall" the mean over every sample.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megawan.models.vae.lpips import lpips_video
from megawan.utils.video_metrics import psnr, ssim

METRICS = ("psnr", "ssim", "lpips")


def _samples(clips: Iterable) -> Iterable:
    """(id, bucket, video [3, T, H, W]) from clip dicts whose "video" is one clip or a batch [B, 3, T, H, W]."""
    for n, clip in enumerate(clips):
        video = clip["video"]
        batch = video if video.dim() == 5 else video[None]
        for i, v in enumerate(batch):
            ids = clip.get("ids")
            sample_id = ids[i] if ids is not None else clip.get("id", str(n)) + (f"#{i}" if video.dim() == 5 else "")
            yield sample_id, clip.get("bucket") or "x".join(str(s) for s in v.shape[1:]), v


def _means(rows: list) -> dict:
    out = {"samples": len(rows)}
    for m in METRICS:
        values = [r[m] for r in rows if m in r]
        if values:
            out[m] = sum(values) / len(values)
    return out


@torch.no_grad()
def evaluate_vae(vae, clips: Iterable, lpips=None, keep: int = 0) -> dict:
    """Reconstruct each clip and score it.

    clips: dicts {"video": float [3, T, H, W] (or a batch [B, 3, T, H, W]) in [-1, 1], "bucket": name (default
    "TxHxW" of the video), "id": name (or "ids": one per batch row)}; lpips: a megawan.models.vae.lpips.LPIPS or
    None; keep: how many reconstructions to return (the first ones, for media). Returns {"buckets": {bucket:
    {"psnr", "ssim", ["lpips",] "samples"}}, "overall": {alike}, "samples": [{"id", "bucket", "psnr", "ssim",
    ["lpips"]}], "reconstructions": [float [3, T, H, W] on the CPU, the first `keep`]}."""
    param = next(vae.parameters())
    rows, kept = [], []
    for sample_id, bucket, video in _samples(clips):
        x = video[None].to(param.device).float()  # the reference stays fp32 whatever the VAE's dtype
        mean, _ = vae.encode(x.to(param.dtype))
        recon = vae.decode(mean).float()
        row = {"id": sample_id, "bucket": bucket, "psnr": float(psnr(recon, x)[0]), "ssim": float(ssim(recon, x)[0])}
        if lpips is not None:
            net_param = next(lpips.parameters())
            row["lpips"] = float(lpips_video(lpips, recon.to(net_param.device), x.to(net_param.device))[0])
        rows.append(row)
        if len(kept) < keep:
            kept.append(recon[0].cpu())
    buckets = {}
    for row in rows:
        buckets.setdefault(row["bucket"], []).append(row)
    return {"buckets": {b: _means(r) for b, r in sorted(buckets.items())}, "overall": _means(rows), "samples": rows,
            "reconstructions": kept}
