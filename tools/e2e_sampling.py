"""tools/gpu_e2e.py's sampling phases: `megawan generate` from the run's checkpoint (phase 5), and diffusers'
WanPipeline on the converted checkpoint sampling the same noise (phase 6), compared latent for latent."""

from __future__ import annotations

import os

import torch

from e2e_support import check, rel_error, run_cli
from e2e_train import latest_step

PROMPT = "a red circle moves right"
NEGATIVE = "a blurry still frame"  # an explicit negative prompt: both samplers encode the same text
BF16_TOLERANCE = 1e-2  # diffusers' bf16 pipeline against megawan generate, max |diff| / max |latents|
GUIDANCE = 4.0  # classifier-free guidance in both samplers
MIN_CHANGE = 0.05  # the sampled latents must differ from the noise by this much of its scale


def phase_generate(run, out: dict) -> None:
    from megawan.utils.media import read_video

    p = run.plan
    check(run.state.get("ckpt") and latest_step(run.state["ckpt"]) is not None, "training wrote no checkpoint")
    frames, height, width = p.frames, p.height, p.width
    out.update(sampled_on=run.device, size=[frames, height, width])
    noise = torch.randn(4, (frames - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator().manual_seed(7))
    torch.save(noise, run.path("noise.pt"))
    out_mp4, latents = run.path("generated.mp4"), run.path("generated_latents.pt")
    args = ["generate", "--ckpt", run.state["ckpt"], "--encoders", os.path.dirname(run.state["encoders"]["vae"]),
            "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--frames", str(frames), "--height", str(height),
            "--width", str(width), "--steps", str(p.gen_steps), "--shift", "3", "--guidance", str(GUIDANCE),
            "--noise", run.path("noise.pt"), "--save-latents", latents, "--out", out_mp4, "--device", run.device]
    if run.cuda:  # no TF32 in cuBLAS / cuDNN: these latents are compared with diffusers' fp32 pipeline
        env = dict(run.env, NVIDIA_TF32_OVERRIDE="0")
    else:
        env = run.env
    child = run_cli(args, run.path("generate.log"), env, run.timeout(240))
    if run.cuda:
        out["peak_gpu_gb"] = child.peak_gb()
    video = read_video(out_mp4)
    check(video.shape == (frames, height, width, 3),
          f"{out_mp4} is {video.shape}, expected {(frames, height, width, 3)}")
    out["video"] = os.path.relpath(out_mp4, run.work)
    lat = torch.load(latents, weights_only=True)
    finite = bool(torch.isfinite(lat).all())
    check(tuple(lat.shape) == (1, *noise.shape) and finite,
          f"saved latents {tuple(lat.shape)} (finite: {finite}), expected {(1, *noise.shape)}")
    out["change_from_noise"] = round(rel_error(lat[0], noise), 4)
    run.state.update(gen_size=(frames, height, width), gen_latents=lat, noise=noise)


def phase_diffusers(run, out: dict) -> None:
    import numpy as np
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from megawan.export import convert_pipeline

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    folder = run.path("diffusers")
    # generation sampled the checkpoint's EMA weights (its default when the run keeps an EMA): export those
    convert_pipeline(run.state["ckpt"], "megawan", folder, "diffusers",
                     encoders=os.path.dirname(run.state["encoders"]["vae"]), ema=True)

    class WanGridUniPC(UniPCMultistepScheduler):
        """diffusers' UniPC on Wan's sigma grid, megawan's `unipc` (tests/test_generate.py does the same)."""

        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    device = torch.device(run.device)
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (the patch embedding is a convolution)
    pipe = WanPipeline.from_pretrained(folder)  # everything fp32: the text encoder stays so for both runs
    pipe.scheduler = WanGridUniPC.from_config(pipe.scheduler.config, flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    frames, height, width = run.state["gen_size"]
    ours, noise = run.state["gen_latents"], run.state["noise"]
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    found = {}
    # fp32: the conversion and the two samplers must agree to rounding. GPU also bf16, the transformer loaded by
    # diffusers' own cast (which keeps its fp32 modules), as a bf16 pipeline runs
    for dtype in (torch.float32, torch.bfloat16) if run.cuda else (torch.float32,):
        if dtype != torch.float32:
            pipe.transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer",
                                                                     torch_dtype=dtype).to(device)
        with torch.no_grad():
            found[dtype] = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                                num_frames=frames, num_inference_steps=run.plan.gen_steps, guidance_scale=GUIDANCE,
                                latents=noise[None].to(device), output_type="latent",
                                max_sequence_length=run.plan.model["text_len"]).frames.float().cpu()
    if run.cuda:
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del pipe
    if run.cuda:
        torch.cuda.empty_cache()
    err, tol = rel_error(ours, found[torch.float32]), run.plan.tolerance
    out.update(rel_error_fp32=err, tolerance_fp32=tol, latents_max_abs=round(float(ours.abs().max()), 4))
    if torch.bfloat16 in found:
        # diffusers' bf16 pipeline from its own fp32 one: bf16 rounding, which guidance amplifies
        floor = rel_error(found[torch.float32], found[torch.bfloat16])
        out.update(rel_error_bf16=rel_error(ours, found[torch.bfloat16]), bf16_vs_fp32_diffusers=floor,
                   tolerance_bf16=BF16_TOLERANCE)
    check(err <= tol, f"diffusers' WanPipeline (fp32) and megawan generate sampled different latents: "
                      f"max |diff| / max |latents| = {err:.2e} > {tol:g}")
    if "rel_error_bf16" in out:
        check(out["rel_error_bf16"] <= max(BF16_TOLERANCE, 1.5 * floor),
              f"diffusers' bf16 WanPipeline is {out['rel_error_bf16']:.2e} (max |diff| / max |latents|) from "
              f"megawan generate, over {BF16_TOLERANCE:g} and over 1.5x its own distance from its fp32 run "
              f"({floor:.2e})")
    # agreement means something only if the model moved the latents: a model whose output is ~0 leaves the
    # noise, and any two samplers agree on that
    moved = rel_error(ours[0], noise)
    check(moved > MIN_CHANGE, f"the sampled latents are the noise again (max change {moved:.3f} of its scale, "
                              f"needs > {MIN_CHANGE}): the comparison above says nothing")
