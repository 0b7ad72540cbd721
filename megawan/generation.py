"""Videos from a trained megawan checkpoint for text prompts, in one process: umT5 encodes the prompts, the
DiT (EMA weights when the run kept them) integrates the flow with UniPC / Euler and classifier-free guidance,
the Wan-VAE decodes, PyAV writes the mp4. The demo's last step; `megawan generate` (parallel sampling,
official defaults) builds on the same pieces.

    # inside an initialised process group of one rank (megawan.parallel.launch.spawn_local(fn, world_size=1))
    paths = generate_videos("runs/demo/checkpoints", encoders, ["a red circle moves left"], "runs/demo/samples",
                            frames=17, height=32, width=48)
"""

from __future__ import annotations

import os
import re

import torch
import yaml


def encode_prompts(prompts: list, encoders: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """umT5 states [N, text_len, dim], zero past each prompt, rounded to the store's dtype as training saw."""
    from megawan.config import text_preset
    from megawan.models.loading import load_text_encoder, load_tokenizer

    cfg = text_preset(encoders["text_config"])
    encoder = load_text_encoder(encoders["text_encoder"], cfg).eval()
    tokenizer = load_tokenizer(encoders["tokenizer"], max_length=cfg.text_len)
    with torch.no_grad():
        ids, mask = tokenizer(list(prompts))
        states = encoder(ids, mask)
    return (states * mask[..., None]).to(dtype).float()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def generate_videos(checkpoint: str, encoders: dict, prompts: list, out_dir: str, frames: int, height: int,
                    width: int, sampler: str = "unipc", steps: int = 25, shift: float = 3.0, guidance: float = 3.0,
                    seed: int = 0, fps: int = 16, use_ema: bool = True) -> list:
    """One mp4 (or png for frames=1) per prompt under out_dir; returns their paths. Single rank (TP = PP = CP = 1)."""
    from megawan.config import DiTConfig, vae_preset
    from megawan.data.synthetic import write_video
    from megawan.diffusion.samplers import make_sampler, sample
    from megawan.models.dit import WanDiT
    from megawan.models.loading import load_vae
    from megawan.training.checkpoint import load_checkpoint, resolve_checkpoint
    from megawan.training.ema import EMA
    from megawan.utils.images import video_to_uint8

    path = resolve_checkpoint(checkpoint)
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        run = yaml.safe_load(f)
    model_cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in run["model"].items()})
    model = WanDiT(model_cfg).eval()
    ema = EMA([model], run["train"]["ema_decay"]) if run["train"].get("ema_decay") else None
    load_checkpoint(path, [model], ema=ema)
    if ema is not None and use_ema:
        ema.apply()

    vae_cfg = vae_preset(encoders["vae_config"])
    vae = load_vae(encoders["vae"], vae_cfg).eval()
    t_stride, s_stride = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    shape = (vae_cfg.z_dim, (frames - 1) // t_stride + 1, height // s_stride, width // s_stride)
    mean = torch.tensor(vae_cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_cfg.latents_std).view(1, -1, 1, 1, 1)

    text = encode_prompts(prompts, encoders)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, prompt in enumerate(prompts):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))[None]
        cond = text[i:i + 1]
        text_in = torch.cat([cond, torch.zeros_like(cond)]) if guidance != 1.0 else cond

        def velocity(x, timestep):
            with torch.no_grad():
                return model(x, timestep, text_in)

        latents = sample(velocity, noise, make_sampler(sampler, steps, shift), guidance=guidance)
        with torch.no_grad():
            video = video_to_uint8(vae.decode(latents * std + mean)[0])
        name = os.path.join(out_dir, f"{i:03d}_{slug(prompt)}")
        if video.shape[0] > 1:
            write_video(name + ".mp4", video, fps=fps)
            paths.append(name + ".mp4")
        else:
            from PIL import Image

            Image.fromarray(video[0]).save(name + ".png")
            paths.append(name + ".png")
    return paths
