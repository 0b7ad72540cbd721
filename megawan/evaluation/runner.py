"""`megawan eval`: generate from a checkpoint for a prompt set and score what came out, in one command, so that
runs on different checkpoints are comparable rows of one table.

    megawan eval --ckpt runs/demo/checkpoints --encoders runs/demo/data/encoders --suite synthetic --out eval
    megawan eval --ckpt ... --prompts prompts.txt --reference held_out.jsonl --i3d rgb_imagenet.pt --out eval
    megawan eval --vae trained=runs/vae/checkpoints --vae-clips held_out.jsonl --out eval

What a run measures (each when its inputs are given):

- the synthetic suite (--suite synthetic: the fixed prompts of megawan.evaluation.synthetic_suite; --prompts FILE:
  the file's prompts, each check scored where a prompt names its colour / shape / direction): colour, shape and
  direction accuracy and a row per sample;
- FVD (megawan.evaluation.fvd) of the generated clips against --reference (a folder of videos or a manifest)
  with the user's I3D weights (--i3d rgb_imagenet.pt);
- VAE reconstruction (--vae SPEC ... --vae-clips MANIFEST): PSNR / SSIM (LPIPS with its weight files) through
  megawan.vae_eval.compare_vaes, in the generation's size unless --vae-buckets says otherwise.

Written to OUT/LABEL/: videos/ (the generated clips and their OUT.json records), results.json (every number, per
sample too) and vae/ (compare_vaes' files); one row appended to OUT/results.jsonl and the table of all rows
rewritten, OUT/results.md (megawan.evaluation.results). Every input is checked before the model loads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Optional

from megawan.data.manifest import IMAGE_EXTENSIONS, read_manifest
from megawan.evaluation.results import append_row, read_rows
from megawan.evaluation.synthetic_suite import SUITE_SIZE, score_clip, suite_accuracy, suite_prompts
from megawan.utils.user_errors import UserError

SUITES = ("synthetic",)
VIDEO_FILES = (".mp4", ".webm", ".mkv", ".mov", ".avi")


@dataclasses.dataclass
class EvalOptions:
    out: str
    ckpt: Optional[str] = None
    encoders: Optional[str] = None
    suite: Optional[str] = None  # "synthetic"
    suite_size: int = SUITE_SIZE
    prompts: Optional[str] = None  # a file, one prompt per line
    reference: Optional[str] = None  # videos for FVD: a folder or a manifest
    i3d: Optional[str] = None  # rgb_imagenet.pt (pytorch-i3d layout)
    vaes: tuple = ()  # "[LABEL=]PATH" specs, as tools/eval_vae.py takes them
    vae_clips: Optional[str] = None
    vae_buckets: tuple = ()  # "FxHxW"; default: the generated size
    lpips_vgg: Optional[str] = None
    lpips_lin: Optional[str] = None
    label: Optional[str] = None
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    shift: Optional[float] = None
    guidance: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def read_prompts(path: str) -> list:
    """The non-empty lines of a prompt file; a missing or empty file is refused naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: the file holds no prompt (one prompt per line)")
    return prompts


def _default_label(opts: EvalOptions) -> str:
    """The run's name from its checkpoint's path: runs/demo/checkpoints -> "demo", runs/demo/checkpoints/iter_0000600
    -> "demo-iter_0000600" (a VAE-only run: the first --vae's path alike)."""
    path = os.path.normpath(os.path.abspath(opts.ckpt or opts.vaes[0].rpartition("=")[2]))
    parts = [p for p in path.split(os.sep) if p]
    step = parts.pop() if parts and parts[-1].startswith("iter_") else None
    while len(parts) > 1 and parts[-1] in ("checkpoints", "latest"):
        parts.pop()
    return "-".join(filter(None, [parts[-1] if parts else "run", step]))


def reference_videos(spec: str) -> list:
    """(id, path, start, end) of every video of a folder (sorted, recursively) or manifest (.jsonl / .csv); stills
    are left out (FVD compares clips)."""
    if os.path.isdir(spec):
        found = []
        for root, _, names in os.walk(spec):
            found += [os.path.join(root, n) for n in names if os.path.splitext(n)[1].lower() in VIDEO_FILES]
        rows = [(os.path.relpath(p, spec), p, None, None) for p in sorted(found)]
    elif os.path.isfile(spec):
        rows = [(e.id, e.path, e.start, e.end) for e in read_manifest(spec)
                if os.path.splitext(e.path)[1].lower() not in IMAGE_EXTENSIONS]
    else:
        raise FileNotFoundError(f"--reference {spec}: no such folder or manifest")
    if len(rows) < 2:
        raise UserError(f"--reference {spec}: holds {len(rows)} video(s); FVD needs at least 2")
    return rows


def check_options(opts: EvalOptions) -> dict:
    """Everything a run needs, checked before any model loads: {"prompts": [...] or None, "prompt_set": what
    they are, "label", "i3d": the loaded network or None, "reference": [...] or None}. A mistake is a UserError /
    FileNotFoundError naming the flag and file."""
    if opts.ckpt is None and not opts.vaes:
        raise UserError("give --ckpt (generate and score) and / or --vae with --vae-clips (VAE reconstruction)")
    if opts.suite is not None and opts.prompts is not None:
        raise UserError("--suite and --prompts: give one prompt set")
    if opts.suite is not None and opts.suite not in SUITES:
        raise UserError(f"--suite {opts.suite}: unknown suite (one of {', '.join(SUITES)})")
    if opts.ckpt is None and (opts.suite or opts.prompts or opts.reference or opts.i3d):
        raise UserError("--suite / --prompts / --reference / --i3d score generated videos: give --ckpt too")
    if bool(opts.vaes) != bool(opts.vae_clips):
        raise UserError("--vae and --vae-clips go together (the VAEs and the clips they reconstruct)")
    if (opts.reference is None) != (opts.i3d is None):
        raise UserError("--reference and --i3d go together (FVD compares with reference videos through I3D)")
    if (opts.lpips_vgg is None) != (opts.lpips_lin is None):
        raise UserError("--lpips-vgg and --lpips-lin go together (LPIPS needs both files)")
    if opts.suite_size < 1:
        raise UserError(f"--suite-size {opts.suite_size}: at least 1")
    if opts.vaes and opts.ckpt is None and not opts.vae_buckets:
        raise UserError("--vae without --ckpt: give --vae-buckets FxHxW (the sizes the clips are cut to)")
    plan = {"prompts": None, "prompt_set": None, "i3d": None, "reference": None}
    if opts.ckpt is not None:
        if opts.prompts is not None:
            plan["prompts"], plan["prompt_set"] = read_prompts(opts.prompts), opts.prompts
        else:  # the synthetic suite is the default prompt set
            plan["prompts"], plan["prompt_set"] = suite_prompts(opts.suite_size), f"synthetic:{opts.suite_size}"
    if opts.vae_clips is not None and not os.path.isfile(opts.vae_clips):
        raise FileNotFoundError(f"--vae-clips {opts.vae_clips}: no such manifest")
    for spec in opts.vaes:  # "[LABEL=]PATH", as megawan.vae_eval.load_any_vae reads it
        path = spec.rpartition("=")[2] if "=" in spec and not os.path.exists(spec) else spec
        if not os.path.exists(path):
            raise FileNotFoundError(f"--vae {path}: no such file or folder")
    label = opts.label or _default_label(opts)
    if any(r.get("label") == label for r in read_rows(opts.out)):
        raise UserError(f"--label {label}: {opts.out} already holds a run of that name (choose another --label)")
    plan["label"] = label
    if opts.i3d is not None:
        from megawan.evaluation.i3d import load_i3d

        plan["reference"] = reference_videos(opts.reference)
        plan["i3d"] = load_i3d(opts.i3d)  # a wrong shape or a missing key: named before generation starts
    return plan


def _generate(opts: EvalOptions, prompts: list, folder: str) -> tuple:
    """Sample `prompts` into `folder` (collective over the world); (paths in prompt order, resolved settings)."""
    import torch.distributed as dist

    from megawan.config import ParallelConfig
    from megawan.generation import GenerationRequest, generate, prepare, slug
    from megawan.parallel import initialize
    from megawan.utils.media import media_suffix

    req = GenerationRequest(ckpt=opts.ckpt, prompts=prompts, out=folder, encoders=opts.encoders, frames=opts.frames,
                            height=opts.height, width=opts.width, steps=opts.steps, shift=opts.shift,
                            guidance=opts.guidance, seed=opts.seed, device=opts.device, progress=opts.progress)
    plan = prepare(req)  # a missing or damaged checkpoint, a size the model cannot take: before the process group
    initialize(ParallelConfig(), backend="gloo" if opts.device == "cpu" else None, seed=opts.seed)
    generate(req)
    dist.barrier()
    suffix = media_suffix(plan["frames"])
    paths = [os.path.join(folder, f"{i:03d}_{slug(p)}{suffix}") for i, p in enumerate(prompts)]
    settings = {k: plan[k] for k in ("frames", "height", "width", "steps", "shift", "fps")}
    settings.update(guidance=plan["guidance"], seed=opts.seed, model=plan["cfg"].name)
    return paths, settings


def _device(opts: EvalOptions):
    """Where the scoring networks (I3D, the VAEs, LPIPS) run: this rank's GPU unless --device cpu."""
    from megawan.capabilities import rank_device

    return "cpu" if opts.device == "cpu" else rank_device()


def _fvd(opts: EvalOptions, plan: dict, generated: list, fps: float) -> dict:
    from megawan.data.video import decode_video
    from megawan.evaluation.fvd import FVD_FRAMES, fvd, i3d_features
    from megawan.evaluation.i3d import MIN_FRAMES

    clips, skipped = [], []
    for sample_id, path, start, end in plan["reference"]:
        frames = decode_video(path, fps=fps, num_frames=FVD_FRAMES, start=start, end=end)
        if frames.shape[0] < MIN_FRAMES:
            skipped.append({"id": sample_id, "reason": f"{frames.shape[0]} frames; I3D needs {MIN_FRAMES}"})
        else:
            clips.append(frames)
    if len(clips) < 2:
        raise UserError(f"--reference: {len(clips)} clip(s) of at least {MIN_FRAMES} frames; FVD needs 2")
    net = plan["i3d"].to(_device(opts))
    real, fake = i3d_features(net, clips), i3d_features(net, generated)
    return {"fvd": fvd(real, fake), "reference_clips": len(clips), "generated_clips": len(generated),
            "skipped": skipped, "features": "I3D logits (400) averaged over time, clips resized to 224 x 224, "
                                            f"[-1, 1], first {FVD_FRAMES} frames"}


def _vae(opts: EvalOptions, folder: str, buckets: list) -> dict:
    from megawan.data.eval_clips import eval_clips
    from megawan.vae_eval import compare_vaes, load_any_vae

    lpips = None
    if opts.lpips_vgg:
        from megawan.models.vae.lpips import LPIPS

        lpips = LPIPS.from_files(opts.lpips_vgg, opts.lpips_lin, fields=("--lpips-vgg", "--lpips-lin")).to(
            _device(opts))
    vaes, sources = {}, {}
    for spec in opts.vaes:
        label, vae = load_any_vae(spec, device=_device(opts))
        while label in vaes:
            label += "'"
        vaes[label], sources[label] = vae, spec
    stride = next(iter(vaes.values())).vae_config.temporal_stride
    clips, skipped = eval_clips(opts.vae_clips, buckets, temporal_stride=stride)
    return compare_vaes(vaes, clips, folder, lpips=lpips, media=2, sources=sources, skipped=skipped)


def _row(label: str, opts: EvalOptions, plan: dict, results: dict, path: str) -> dict:
    suite = results.get("suite") or {}
    vaes = (results.get("vae") or {}).get("vaes", {})
    row = {"label": label, "ckpt": opts.ckpt, "prompts": plan["prompt_set"],
           "samples": len(suite.get("samples", [])) or None,
           **{check: suite.get(check) for check in ("color", "shape", "direction")},
           "fvd": (results.get("fvd") or {}).get("fvd"), "results": path,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for metric in ("psnr", "ssim", "lpips"):
        values = {name: v["overall"][metric] for name, v in vaes.items() if metric in v["overall"]}
        row[f"vae_{metric}"] = values or None
    s = results.get("settings")
    row["settings"] = (f"{s['frames']}x{s['height']}x{s['width']}, {s['steps']} steps, guidance {s['guidance']}, "
                       f"seed {s['seed']}") if s else None
    return row


def evaluate(opts: EvalOptions) -> Optional[dict]:
    """Run `megawan eval` (collective under torchrun / srun: every rank calls it, the prompts are split over the
    ranks); returns the run's results on rank 0 (what OUT/LABEL/results.json holds), None on the others."""
    plan = check_options(opts)
    label = plan["label"]
    folder = os.path.join(opts.out, label)
    results = {"label": label, "checkpoint": opts.ckpt, "prompts": plan["prompt_set"]}
    frames_of = {}
    if opts.ckpt is not None:
        paths, settings = _generate(opts, plan["prompts"], os.path.join(folder, "videos"))
        results["settings"] = settings
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return None
        from megawan.utils.media import read_media

        frames_of = {p: read_media(p) for p in paths}
        rows = [dict(score_clip(frames_of[p], prompt, str(i)), video=p)
                for i, (prompt, p) in enumerate(zip(plan["prompts"], paths))]
        results["suite"] = suite_accuracy(rows)
        if plan["i3d"] is not None:
            results["fvd"] = _fvd(opts, plan, list(frames_of.values()), float(settings["fps"]))
    if opts.vaes:
        s = results.get("settings")
        buckets = list(opts.vae_buckets) or [f"{s['frames']}x{s['height']}x{s['width']}"]
        results["vae"] = _vae(opts, os.path.join(folder, "vae"), buckets)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    append_row(opts.out, _row(label, opts, plan, results, path))
    return results
