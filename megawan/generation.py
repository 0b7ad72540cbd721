"""Videos from a Wan DiT: `megawan generate`. Text-to-video, image-to-video (first frame; FLF2V: first and last),
TI2V-5B and the two-expert A14B models, from a training checkpoint or a converted pipeline, on one rank or many.
Image-to-video takes the image's aspect ratio as the official repos size it (megawan.utils.conditioning_images;
docs/generation.md) unless height and width are given.

    # one process (a one-rank world is started for it), or every rank under torchrun / srun
    paths = generate(GenerationRequest(ckpt="runs/demo/checkpoints", encoders="runs/demo/data/encoders",
                                       prompts=["a red circle moves left"], out="red.mp4"))

Parallel sampling: the world is laid out as data x context x tensor parallel (megatron's order). TP ranks split
the weights, CP ranks split the video tokens (the model gathers the velocity at its head), so every rank of a
model replica advances the same latents with the same sampler. Data-parallel replicas split the prompts.
Classifier-free guidance runs the conditional and unconditional batch in one model call. The text encoder
is split over the TP ranks like the DiT, and so is Wan2.1's CLIP image encoder; each replica's first rank encodes
the conditioning frames with the VAE (I2V / FLF2V / TI2V) and sends the latents to its peers, and decodes with the
VAE and writes the files. Latents are fp32, as Wan keeps them; the result does not depend on the layout.

Devices (`device`, CLI --device): every rank runs the DiT, the umT5 encoder (bf16 on CUDA) and the VAE on its
own device and keeps every tensor there; only the initial noise is drawn on the host (the same in any layout and
on any device) and the videos come back to be written. auto = `rank_device()` (cuda:LOCAL_RANK where CUDA is);
the device must suit the process group: NCCL reduces CUDA tensors only, gloo across ranks CPU tensors only
(`megawan generate` starts the one that suits --device; a lone Python process calls
`megawan.parallel.initialize()` first, which starts NCCL where CUDA is).

Defaults follow the official Wan repos per model (`official_defaults`): steps, shift, guidance (A14B: one scale
per expert, the expert chosen by the official boundary), frames, size, fps and the default negative prompt.
A checkpoint trained by megawan with `train.text_dropout` has learned the zero text states as its null
condition: that is its unconditional input unless --negative-prompt is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megawan.artifacts import (
    find_encoders,
    load_clip_encoder,
    load_dit,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    resolve_model,
)
from megawan.capabilities import cuda_available, rank_device, resolve_backend
from megawan.config import ParallelConfig, clip_preset, text_preset
from megawan.config.te_limits import te_tokens_problem
from megawan.config.vae_files import vae_config_named
from megawan.checkpoint import has_ema
from megawan.convert.dit_keys import dit_param_shapes
from megawan.convert.files import load_torch_file
from megawan.data.buckets import Bucket
from megawan.data.conditioning import expand_mask, frame_mask
from megawan.diffusion.defaults import official_defaults
from megawan.diffusion.flow import FlowMatching
from megawan.diffusion.samplers import make_sampler, sample
from megawan.env_report import megawan_version
from megawan.export import lora_base, read_lora_checkpoint
from megawan.lora import load_lora, merge_adapters, read_lora_file
from megawan.lora.formats import check_shapes
from megawan.parallel.groups import context_parallel_groups
from megawan.utils.conditioning_images import (
    crop_to_aspect,
    i2v_pixels,
    i2v_size,
    open_image,
    ti2v_pixels,
    ti2v_size,
    to_tensor,
)
from megawan.utils.images import video_to_uint8
from megawan.utils.media import IMAGE_SUFFIX, VIDEO_SUFFIX, media_suffix, write_media
from megawan.utils.progress import Progress

@dataclasses.dataclass
class GenerationRequest:
    ckpt: str  # a training checkpoint (or a run's checkpoint dir), or a converted megawan pipeline
    prompts: list
    out: str  # OUT.mp4 (one prompt) or a folder
    encoders: Optional[str] = None  # folder with the VAE, umT5 and tokenizer (a pipeline carries its own)
    low_noise_ckpt: Optional[str] = None  # A14B from two training runs: the low-noise expert's checkpoint
    negative_prompt: Optional[str] = None
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    sampler: str = "unipc"
    shift: Optional[float] = None
    guidance: Optional[object] = None  # a number, or (low-noise, high-noise) for A14B
    seed: int = 0
    fps: Optional[int] = None
    image: Optional[str] = None  # the first frame (I2V, FLF2V, TI2V)
    last_image: Optional[str] = None  # the last frame (FLF2V)
    max_area: Optional[int] = None  # image-to-video without height / width: pixels (default: official h x w)
    noise: Optional[str] = None  # a .pt tensor [C, T, H, W] or [N, C, T, H, W]: the initial latent noise
    save_latents: Optional[str] = None  # write the final (normalised) latents [N, C, T, H, W] here (.pt)
    use_ema: bool = True
    progress: bool = True
    text_dtype: str = "float32"  # "bfloat16": round the text states as a bf16 latent store holds them
    vae_tiling: Optional[tuple] = None  # (tile, stride) in pixels: decode 720p on small GPUs
    device: str = "auto"  # auto | cpu | cuda: where this rank's models and tensors live (generation_device)
    loras: tuple = ()  # (LoRA file, scale) pairs merged into the DiT's weights after loading (--lora FILE[:SCALE])


# ----------------------------------------------------------------------------------------------
# Conditioning


def _conditioning_frames(req, cfg, height, width, area: int, vae_cfg) -> tuple:
    """((height, width), {"first": [3, H, W], "last": [3, H, W] or None, "clip": the images CLIP sees} in [-1, 1],
    what was done to the images as one line or None) for an image request; sizes not given follow the image as
    the official repos choose. CLIP (Wan2.1) sees the images before they are resized to the video (cropped to
    its aspect ratio when that was asked): its own preprocessing resizes them, as the official code."""
    img = open_image(req.image, "--image")
    last = open_image(req.last_image, "--last-image") if req.last_image else None
    stride, patch = vae_cfg.spatial_stride, cfg.patch_size[1]
    if height is None:
        height, width = (ti2v_size(img.height, img.width, area, stride * patch) if cfg.model_type == "ti2v"
                         else i2v_size(img.height, img.width, area, stride, patch))
        note = (f"{width}x{height} video: the aspect ratio of --image ({img.width}x{img.height}) within {area} "
                f"pixels, as the official {cfg.name} sampler picks it (--height / --width choose another)")
    elif (img.width, img.height) == (width, height):
        note = None
    elif cfg.model_type == "ti2v":
        note = (f"--image {img.width}x{img.height} resized to cover the {width}x{height} video"
                + ("" if img.width * height == img.height * width else " and centre-cropped"))
    else:
        src = crop_to_aspect(img, height, width)
        note = (f"--image {img.width}x{img.height} resized to the {width}x{height} video" if src is img else
                f"--image {img.width}x{img.height} has another aspect ratio than the {width}x{height} video: "
                f"centre-cropped to {src.width}x{src.height}, then resized")
        img = src
    if cfg.model_type == "ti2v":
        return (height, width), {"first": ti2v_pixels(img, height, width), "last": None, "clip": None}, note
    frames = {"first": i2v_pixels(img, height, width), "last": None,
              "clip": [to_tensor(img)] if cfg.image_dim else None}
    if last is not None:
        fitted = crop_to_aspect(last, img.height, img.width)
        if fitted is not last:
            note = "; ".join(filter(None, [note, f"--last-image {last.width}x{last.height} centre-cropped to "
                                                  f"{fitted.width}x{fitted.height}, the aspect ratio of --image"]))
        frames["last"] = i2v_pixels(fitted, height, width)
        if cfg.image_dim:
            frames["clip"].append(to_tensor(fitted))
    return (height, width), frames, note


def _i2v_condition(vae, first: torch.Tensor, frames: int, temporal_stride: int,
                   last: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Wan's I2V input beside the noise: the frame mask (4 channels per latent frame, megawan.data.conditioning's,
    as the store holds it for training) and the normalised VAE latents of the first frame, zero frames (and the
    last frame: FLF2V). [1, 4 + z, T', H', W'] on the image's device."""
    video = torch.zeros(1, 3, frames, *first.shape[1:], device=first.device)
    video[0, :, 0] = first
    if last is not None:
        video[0, :, -1] = last
    with torch.no_grad():
        mean, _ = vae.encode(video)
    z = vae.normalize(mean.float())
    mask = frame_mask("flf2v" if last is not None else "i2v", frames, temporal_stride).to(z.device)
    return torch.cat([expand_mask(mask, *z.shape[3:])[None], z], dim=1)


def generation_device(name: str, backend: str, world_size: int) -> torch.device:
    """This rank's device for --device `name` (auto | cpu | cuda) in a world of `world_size` ranks over
    `backend`. auto: `rank_device()`, except the CPU across gloo ranks (spawn_local's harness on a GPU machine).
    A device the process group cannot communicate is refused."""
    gloo_ranks = backend == "gloo" and world_size > 1
    if name == "auto":
        return torch.device("cpu") if gloo_ranks else rank_device()
    if name == "cpu":
        if backend == "nccl":
            raise ValueError("--device cpu: the process group is NCCL, whose collectives take CUDA tensors only "
                             "(megawan generate --device cpu starts gloo)")
        return torch.device("cpu")
    if name == "cuda":
        if not cuda_available():
            raise ValueError("--device cuda: this machine has no CUDA device (use --device cpu or auto)")
        if gloo_ranks:
            raise ValueError("--device cuda: the process group is gloo, whose collectives megawan runs across ranks "
                             "on CPU tensors only (megawan generate --device cuda starts NCCL)")
        return rank_device()
    raise ValueError(f"--device {name!r} is not auto, cpu or cuda")


def sampling_backend(cfg, latent_shape: tuple, layout: ParallelConfig) -> tuple:
    """(the DiT config with the backend this layout can sample on, why it changed or None). Transformer Engine's
    context parallelism cannot mask padded tokens (megawan.config.te_limits): `auto` then samples on the local
    backend, an explicit `te` is refused naming the sizes to change."""
    if layout.context_parallel == 1 or resolve_backend(cfg.backend) != "te":
        return cfg, None
    tokens = 1
    for n, p in zip(latent_shape[1:], cfg.patch_size):
        tokens *= n // p
    problem = te_tokens_problem(tokens, layout)
    if problem is None:
        return cfg, None
    if cfg.backend == "te":
        raise ValueError(f"--frames / --height / --width: {problem}; pick a size whose token count divides, or "
                         "sample on the local backend")
    return dataclasses.replace(cfg, backend="local"), f"sampling on the local backend: {problem}"


def prepare(req: GenerationRequest) -> dict:
    """What `req` asks for, checked before any process group or model: the model ("found", "cfg"), the
    official defaults filled in ("frames", "height", "width", "steps", "shift", "fps", "guidance", "defaults"),
    the encoders ("enc", "vae_cfg") and the conditioning frames ("images": {"first", "last"} or None, "note":
    what was done to them, one line or None). A request the model cannot take is a ValueError naming the option."""
    found = resolve_model(req.ckpt, req.low_noise_ckpt)
    cfg = found["config"]
    d = official_defaults(cfg.name, cfg.model_type, cfg.expert_boundary, req.height, req.width,
                          req.max_area if req.image is not None and req.height is None else None)
    flf2v = cfg.image_pos_len is not None  # Wan2.1 FLF2V-14B: position embeddings for two images' CLIP tokens
    if cfg.model_type == "i2v" and req.image is None:
        raise ValueError(f"{cfg.name} is an image-to-video model: pass --image FIRST_FRAME"
                         + (" and --last-image LAST_FRAME" if flf2v else ""))
    if cfg.model_type == "t2v" and req.image is not None:
        raise ValueError(f"{cfg.name} is a text-to-video model: it takes no --image")
    if req.last_image is not None and not flf2v:
        raise ValueError(f"--last-image: {cfg.name} is not a first-last-frame model (Wan2.1 FLF2V-14B); it "
                         "conditions on the first frame only (--image)")
    if flf2v and req.last_image is None:
        raise ValueError(f"{cfg.name} is a first-last-frame model: pass --last-image LAST_FRAME too")
    if req.image is not None and (req.height is None) != (req.width is None):
        raise ValueError("--height and --width go together with --image (give neither: the video then takes the "
                         "image's aspect ratio)")
    if req.max_area is not None and (req.image is None or req.height is not None):
        raise ValueError("--max-area sizes a video from its --image: give it with --image and without --height / "
                         "--width")
    loras = [(read_lora_file(path), float(scale)) for path, scale in req.loras]
    if loras and len(found["experts"]) > 1:
        raise ValueError(f"--lora: {cfg.name} has two experts, which take one LoRA each; megawan generate does not "
                         "take per-expert LoRAs yet (merge them with tools/convert_checkpoint.py --merge-lora)")
    for lora, _ in loras:  # a LoRA for another model size, or for linears this model lacks: named before any load
        check_shapes(lora, dit_param_shapes(cfg), cfg.name)
    folder = req.encoders or found["encoders"]
    if folder is None:
        raise ValueError("no encoders: pass --encoders FOLDER (the VAE, umT5 weights and tokenizer)")
    enc = find_encoders(folder)
    vae_cfg = vae_config_named(enc["vae_config"], "the encoders' VAE config")
    plan = dict(found=found, cfg=cfg, defaults=d, enc=enc, vae_cfg=vae_cfg, loras=loras,
                frames=req.frames or d["frames"],
                steps=req.steps or d["steps"], shift=req.shift if req.shift is not None else d["shift"],
                fps=req.fps or d["fps"], guidance=req.guidance if req.guidance is not None else d["guidance"],
                images=None, note=None)
    if req.image is None:
        plan.update(height=req.height or d["height"], width=req.width or d["width"])
    else:
        area = req.max_area or d["height"] * d["width"]
        (plan["height"], plan["width"]), plan["images"], plan["note"] = _conditioning_frames(
            req, cfg, req.height, req.width, area, vae_cfg)
    t_stride, s_stride = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    frames, height, width = plan["frames"], plan["height"], plan["width"]
    if (frames - 1) % t_stride or height % (s_stride * cfg.patch_size[1]) or width % (s_stride * cfg.patch_size[2]):
        raise ValueError(f"frames must be 1 + {t_stride}k and height / width multiples of "
                         f"{s_stride * cfg.patch_size[1]} for {cfg.name} with {enc['vae_config']}; got "
                         f"{frames} x {height} x {width}")
    if cfg.image_dim:
        if enc["clip"] is None:
            raise ValueError(f"{cfg.name} conditions on CLIP image tokens (Wan2.1 I2V / FLF2V), but {folder} holds no "
                             "CLIP image encoder (models_clip_*.pth, image_encoder.safetensors): convert the whole "
                             "pipeline, or pass --encoders a folder with one")
        clip_width = clip_preset(enc["clip_config"]).hidden_size
        if clip_width != cfg.image_dim:
            raise ValueError(f"the CLIP image encoder {enc['clip']} is {clip_width} wide, but {cfg.name} takes "
                             f"{cfg.image_dim}-wide image tokens")
    return plan


def generate(req: GenerationRequest, kept: Optional[dict] = None) -> list:
    """Sample every prompt of `req`; collective over the world (call on every rank). Returns the written paths
    (on the ranks that wrote them). `kept`: a dict that keeps the loaded models between calls (megawan serve
    loads them once; `_kept`), else every call loads them."""
    plan = prepare(req)
    found, cfg, d, enc, vae_cfg = (plan[k] for k in ("found", "cfg", "defaults", "enc", "vae_cfg"))
    frames, height, width, steps, shift, fps, guidance = (plan[k] for k in ("frames", "height", "width", "steps",
                                                                             "shift", "fps", "guidance"))
    if plan["note"] and dist.get_rank() == 0:
        print(f"[generate] {plan['note']}", flush=True)
    if dist.get_rank() == 0:  # once, before the models load: what the defaults filled in
        print(f"[generate] {cfg.name}: {width}x{height}, {frames} frames at {fps} fps; {steps} {req.sampler} steps, "
              f"shift {shift:g}, guidance {guidance}; seed {req.seed}", flush=True)

    rank, world = dist.get_rank(), dist.get_world_size()
    device = generation_device(req.device, dist.get_backend(), world)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    first_of_replica = ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    # the TP x CP ranks that hold one copy of the model (PP = 1 here); its first rank encodes and decodes
    mp_group = ps.get_tensor_and_context_parallel_group() if world > 1 else None
    replica_ranks = dist.get_process_group_ranks(mp_group) if mp_group is not None else [rank]
    if len(replica_ranks) == 1:
        mp_group = None

    vae = _kept(kept, ("vae", enc["vae"], str(device), req.vae_tiling),
                lambda: _load_vae(enc["vae"], vae_cfg, device, req.vae_tiling)) if first_of_replica else None
    t_stride, s_stride = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    shape = (vae_cfg.z_dim, *Bucket(frames, height, width).latent_shape((t_stride, s_stride, s_stride)))

    cp = ps.get_context_parallel_world_size()
    layout = ParallelConfig(tensor_parallel=ps.get_tensor_model_parallel_world_size(), context_parallel=cp,
                            context_parallel_mode=context_parallel_groups().mode if cp > 1 else "ulysses")
    cfg, why = sampling_backend(cfg, shape, layout)
    if why and rank == 0:
        print(f"[generate] {why}", flush=True)
    experts = _kept(kept, ("dit", tuple(found["experts"].items()), req.use_ema, str(device), repr(cfg), req.loras),
                    lambda: _load_experts(found["experts"], cfg, req.use_ema, device, plan["loras"], rank))
    boundary = cfg.expert_boundary * 1000.0 if cfg.expert_boundary is not None else None

    def model_at(t: float):
        if boundary is None:
            return next(iter(experts.values()))
        return experts["high_noise"] if t >= boundary else experts["low_noise"]

    if isinstance(guidance, (tuple, list)):
        low, high = float(guidance[0]), float(guidance[1])
        scale = (lambda t: high if t >= boundary else low) if boundary is not None else low
    else:
        scale = float(guidance)

    prompts = list(req.prompts)
    negative = req.negative_prompt
    if negative is None and not found["null_text"]:
        negative = d["negative_prompt"]
    text_cfg = text_preset(enc["text_config"])
    states = _encode(prompts + ([negative] if negative is not None else []), enc, text_cfg, cfg.text_len,
                     getattr(torch, req.text_dtype), device, kept)
    text, null = states[:len(prompts)], (states[len(prompts):] if negative is not None else None)

    noise_all = _initial_noise(req, len(prompts), shape).to(device)
    mine = list(range(dp_rank, len(prompts), dp_size))
    written, latents_out = [], {}
    image_tokens = _clip_tokens(plan["images"]["clip"], enc, device, kept) if cfg.image_dim else None
    extra, pin, token_timesteps = _image_inputs(plan["images"], cfg, vae, vae_cfg, frames, shape, first_of_replica,
                                                replica_ranks, mp_group, device)
    record = _record(req, plan, negative)
    for i in mine:
        started = time.perf_counter()
        cond = text[i:i + 1]
        uncond = null if null is not None else torch.zeros_like(cond)
        guided = callable(scale) or scale != 1.0
        text_in = torch.cat([cond, uncond]) if guided else cond
        noise = noise_all[i:i + 1]
        bar = Progress(steps, desc=f"sampling {i + 1}/{len(prompts)}", unit="steps",
                       enabled=req.progress and rank == replica_ranks[0])

        def velocity(x, timestep):
            t = float(timestep[0])  # the sampler's grid lives on the host: no device sync
            x_in = x if extra is None else torch.cat([x, extra.expand(x.shape[0], -1, -1, -1, -1)], dim=1)
            timestep = timestep.to(device)
            ts = timestep if token_timesteps is None else token_timesteps(timestep)
            image = None if image_tokens is None else image_tokens.repeat(x.shape[0], 1, 1)  # FLF2V: (first, last)
            with torch.no_grad():
                return model_at(t)(x_in, ts, text_in, image=image).float()

        lat = sample(velocity, noise, make_sampler(req.sampler, steps, shift), guidance=scale,
                     callback=lambda k, x: bar.update(1), pin=pin)
        bar.close()
        latents_out[i] = lat[0].cpu()  # kept for save_latents, gathered as objects
        if first_of_replica:
            written.append(_write(vae, lat, req.out, i, prompts[i], len(prompts), fps))
            _write_record(written[-1], record, i, prompts[i], time.perf_counter() - started)
    if req.save_latents:
        _save_latents(req.save_latents, latents_out, len(prompts), first_of_replica)
    dist.barrier()
    return written


def _kept(kept: Optional[dict], key: tuple, load):
    """load() once per key while `kept` (a dict) lives; every time without it. The key names all that the model
    depends on, so a later request for another checkpoint, device or LoRA loads afresh."""
    if kept is None:
        return load()
    if key not in kept:
        kept[key] = load()
    return kept[key]


def _load_vae(path: str, vae_cfg, device, tiling: Optional[tuple]):
    vae = load_vae(path, vae_cfg, device=device)
    if tiling:
        vae.enable_tiling(*tiling)
    return vae


def _load_experts(paths: dict, cfg, use_ema: bool, device, loras: list, rank: int) -> dict:
    """{expert: its DiT on this rank}, with the LoRA files merged into every expert's weights."""
    experts = {name: _load_expert(path, cfg, use_ema, device) for name, path in paths.items()}
    for lora, lora_scale in loras:  # this rank's shard of scale alpha / rank B A, added to its weights
        for model in experts.values():
            load_lora(model, lora, lora_scale)
            merge_adapters(model)
        if rank == 0:
            print(f"[generate] merged LoRA {lora.path} ({len(lora)} linears) at scale {lora_scale:g}", flush=True)
    return experts


def _load_expert(path: str, cfg, use_ema: bool, device):
    """The DiT of checkpoint `path` on this rank; a LoRA training checkpoint loads its base (the trained weights,
    as the LoRA run started from them) and merges its adapters (their EMA where kept, unless --no-ema)."""
    base = lora_base(path)
    if base is None:
        return load_dit(path, cfg, use_ema, device=device)
    model = load_dit(base, cfg, use_ema=False, device=device)
    load_lora(model, read_lora_checkpoint(path, ema=use_ema and has_ema(path)))
    merge_adapters(model)
    return model


def _encode(texts: list, enc: dict, text_cfg, text_len: int, dtype: torch.dtype = torch.float32,
            device=torch.device("cpu"), kept: Optional[dict] = None) -> torch.Tensor:
    """umT5 states [N, text_len, dim] (zeros past each prompt) on `device`, rounded through `dtype` (bf16: as a
    precomputed store holds them). The encoder runs in bf16 on CUDA (as Wan's), in fp32 on CPU. Collective over
    the tensor-parallel group: the encoder is sharded like the DiT (every CP rank of a replica computes the same
    states)."""
    encoder = _kept(kept, ("text", enc["text_encoder"], str(device)), lambda: load_text_encoder(
        enc["text_encoder"], text_cfg, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None))
    tokenizer = _kept(kept, ("tokenizer", enc["tokenizer"]),
                      lambda: load_tokenizer(enc["tokenizer"], max_length=text_cfg.text_len))
    with torch.no_grad():
        ids, mask = (t.to(device) for t in tokenizer(texts))
        states = (encoder(ids, mask) * mask[..., None]).to(dtype).float()
    return states[:, :text_len] if states.shape[1] > text_len else states


def _clip_tokens(images: list, enc: dict, device: torch.device, kept: Optional[dict] = None) -> torch.Tensor:
    """The CLIP tokens of the conditioning frames [n_images, 1 + (S / patch)^2, width] (FLF2V: first, last), as
    the official Wan2.1 takes them (penultimate block, Wan's bicubic resize to S). Collective over the tensor-
    parallel group: the encoder is split like the DiT and the text encoder (every CP rank of a replica computes
    the same tokens); fp16 on CUDA as Wan's, fp32 on CPU."""
    encoder = _kept(kept, ("clip", enc["clip"], str(device)), lambda: load_clip_encoder(
        enc["clip"], clip_preset(enc["clip_config"]), device=device, dtype=torch.float16 if device.type == "cuda"
        else None))
    with torch.no_grad():  # each image on its own: first and last frame may differ in size
        pixels = torch.cat([encoder.preprocess(image[None].to(device)) for image in images])
        return encoder(pixels).float()


def _initial_noise(req: GenerationRequest, n: int, shape: tuple) -> torch.Tensor:
    if req.noise:
        noise = load_torch_file(req.noise)  # a pickle with code in it is refused, naming the file
        if not isinstance(noise, torch.Tensor):
            raise ValueError(f"--noise {req.noise} holds a {type(noise).__name__}, not a tensor")
        noise = noise.float()
        noise = noise[None] if noise.dim() == 4 else noise
        if tuple(noise.shape[1:]) != tuple(shape) or noise.shape[0] not in (1, n):
            raise ValueError(f"--noise {req.noise} has shape {tuple(noise.shape)}; these prompts need "
                             f"[{n}, {', '.join(map(str, shape))}] (or one [{', '.join(map(str, shape))}])")
        return noise.expand(n, *shape).clone()
    # one generator per prompt: the same noise on every rank and in any layout
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(req.seed + i)) for i in range(n)])


def _image_inputs(images, cfg, vae, vae_cfg, frames, shape, first, ranks, group, device):
    """(extra input channels, pin, per-token timesteps(t)) for the model type, on `device`; all None for T2V.
    The replica's first rank encodes the frames with the VAE and sends the result to its peers."""
    if images is None:
        return None, None, None
    image = images["first"].to(device)
    if cfg.model_type == "i2v":  # mask + first-frame (FLF2V: and last-frame) latents beside the noise
        last = images["last"].to(device) if images["last"] is not None else None
        cond = _i2v_condition(vae, image, frames, vae_cfg.temporal_stride, last) if first else \
            torch.empty(1, vae_cfg.temporal_stride + shape[0], *shape[1:], device=device)
        if group is not None:
            dist.broadcast(cond, src=ranks[0], group=group)
        return cond, None, None
    # TI2V: the first latent frame is the image's, kept clean (timestep 0 on its tokens) all the way
    if first:
        with torch.no_grad():
            mean, _ = vae.encode(image[None, :, None])
        z0 = vae.normalize(mean.float())
    else:
        z0 = torch.empty(1, shape[0], 1, *shape[2:], device=device)
    if group is not None:
        dist.broadcast(z0, src=ranks[0], group=group)
    pin, timesteps = FlowMatching.clean_first_frame_sampling(z0, shape[1:], cfg.patch_size)
    return None, pin, timesteps


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def _output_path(out: str, index: int, prompt: str, count: int, num_frames: int) -> str:
    ext = media_suffix(num_frames)
    if count == 1 and os.path.splitext(out)[1].lower() in (VIDEO_SUFFIX, IMAGE_SUFFIX):
        return os.path.splitext(out)[0] + ext
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, f"{index:03d}_{slug(prompt)}{ext}")


def _write(vae, latents: torch.Tensor, out: str, index: int, prompt: str, count: int, fps: int) -> str:
    with torch.no_grad():
        video = video_to_uint8(vae.decode(vae.denormalize(latents).to(vae.quant_conv.weight.dtype))[0].float())
    path = _output_path(out, index, prompt, count, num_frames=video.shape[0])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_media(path, video, fps=fps)
    return path


def _record(req: GenerationRequest, plan: dict, negative) -> dict:
    """What a video was made from, as asked and as resolved (the model's defaults filled in): the OUT.json beside
    it, enough to make it again."""
    cfg = plan["cfg"]
    guidance = plan["guidance"]
    return {"prompt": None, "negative_prompt": negative,
            "null_condition": "zero text states" if negative is None else "the negative prompt",
            "seed": req.seed, "noise": req.noise, "steps": plan["steps"], "shift": plan["shift"],
            "guidance": list(guidance) if isinstance(guidance, (tuple, list)) else guidance,
            "sampler": req.sampler, "checkpoint": os.path.abspath(req.ckpt),
            "low_noise_checkpoint": os.path.abspath(req.low_noise_ckpt) if req.low_noise_ckpt else None,
            "ema": req.use_ema, "model": cfg.name, "model_type": cfg.model_type,
            "height": plan["height"], "width": plan["width"], "frames": plan["frames"], "fps": plan["fps"],
            "image": req.image, "last_image": req.last_image,
            "loras": [{"file": lora.path, "scale": scale} for lora, scale in plan["loras"]],
            "megawan": megawan_version()}


def _write_record(video: str, record: dict, index: int, prompt: str, seconds: float) -> str:
    """OUT.json beside the video: the record with this prompt, its seed (prompt i's noise is drawn from seed + i,
    as _initial_noise does; none when --noise gave it) and the seconds its sampling and decoding took."""
    path = os.path.splitext(video)[0] + ".json"
    seed = None if record["noise"] else record["seed"] + index
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**record, "prompt": prompt, "seed": seed, "seconds": round(seconds, 2)}, f, indent=2)
    return path


def _save_latents(path: str, mine: dict, count: int, first: bool) -> None:
    """Gather every replica's final latents to rank 0 and write them [N, C, T, H, W] in prompt order."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v for k, v in mine.items()} if first else {})
    if dist.get_rank() == 0:
        merged = {}
        for part in gathered:
            merged.update(part)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(torch.stack([merged[i] for i in range(count)]), path)


def run_generate(rank: int, req: GenerationRequest, result_file: Optional[str] = None) -> None:
    """spawn_local entry: generate, and rank 0 writes the paths to result_file."""
    paths = generate(req)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, paths)
    if dist.get_rank() == 0 and result_file:
        with open(result_file, "w", encoding="utf-8") as f:
            json.dump(sorted(p for part in gathered for p in part), f)
