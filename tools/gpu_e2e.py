#!/usr/bin/env python3
"""The whole pipeline end to end on one device, every phase timed and checked (exit status 1 if one fails):

  1 clips       synthetic H.264 .mp4 clips of moving shapes + their manifest (training and held-out sets)
  2 precompute  tiny Wan-VAE / umT5 / tokenizer (megawan.demo.tiny_assets), then decode (--decode) -> VAE
                latents + umT5 states -> the Zarr stores, on the device
  3 train       `megawan train` on the device, SIGKILLed mid-run once a checkpoint exists, then resumed: it must
                continue from that checkpoint's step (re-logging the same losses) and end at the target step;
                validation (held-out loss + sampled videos) at the end
  4 fp8         a second short run with train.fp8=current (GPU only)
  5 generate    `megawan generate --device` from the checkpoint, on the device -> mp4 +
                the final latents from fixed noise
  6 diffusers   the checkpoint converted to diffusers' layout (megawan.export); diffusers' WanPipeline loads it
                on the device and samples the same noise / prompt / scheduler: its final latents against phase 5's
  7 kernels     pytest tests/test_kernels.py tests/test_fp8_attention.py (GPU only)

    python tools/gpu_e2e.py --json gpu_results/e2e.json            # GPU: 1.3B-wide DiT (2 blocks), bf16, 480x832
    python tools/gpu_e2e.py --device cpu --tiny --json e2e.json    # CPU: the tiny model, fp32 (~40 s of CPU)

On the GPU it is sized (by estimate: it has not run on one yet) to finish in 3-5 of the 8 minutes that
tools/gpu_session.sh gives its `e2e` stage; --budget cuts its child processes short of that.
The JSON (rewritten after every phase) holds each phase's seconds, peak CUDA memory, losses, resume step,
outputs and errors, and the device and torch version.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's megawan

import torch  # noqa: E402

from e2e_sampling import phase_diffusers, phase_generate  # noqa: E402
from e2e_support import ROOT, E2EError, Report, check, child_env, kill_children  # noqa: E402
from e2e_train import phase_fp8, phase_train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    clips: int
    held_out: int
    frames: int
    height: int
    width: int
    model: dict
    precision: str
    steps: int
    checkpoint_every: int
    batch: int
    micro_batch: int
    lr: float
    ema: float
    val_steps: int
    fp8_steps: int
    gen_steps: int
    tolerance: float  # diffusers' fp32 pipeline against megawan generate: max |diff| / max |latents|

    @property
    def bucket(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


_TINY_VAE_DIT = dict(in_dim=4, out_dim=4, text_dim=32, text_len=24)  # the tiny VAE's z_dim, the tiny umT5's width
# lr and EMA such that 6 steps move the tiny model's (zero-initialised) output enough to make sampling and the
# comparison with diffusers mean something
TINY = Plan(clips=4, held_out=2, frames=17, height=32, width=48, model=dict(preset="tiny", **_TINY_VAE_DIT),
            precision="fp32", steps=6, checkpoint_every=2, batch=2, micro_batch=1, lr=1e-2, ema=0.5, val_steps=4,
            fp8_steps=0, gen_steps=6, tolerance=1e-4)
# 33 x 480 x 832 -> latents 9 x 60 x 104 -> 14,040 tokens a clip; micro-batches of 2 clips so that every FP8
# product's inner size (28,080 tokens, 2 x 24 text tokens) is a multiple of 16, as torch._scaled_mm needs
GPU = Plan(clips=8, held_out=2, frames=33, height=480, width=832,
           model=dict(preset="wan2.1-t2v-1.3b", num_layers=2, **_TINY_VAE_DIT), precision="bf16", steps=12,
           checkpoint_every=4, batch=2, micro_batch=2, lr=1e-3, ema=0.9, val_steps=10, fp8_steps=4, gen_steps=8,
           tolerance=1e-3)


class Run:
    """The run's folders and what the phases hand each other."""

    def __init__(self, args, plan: Plan):
        self.args, self.plan, self.device = args, plan, args.device
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="megawan-e2e-"))
        os.makedirs(self.work, exist_ok=True)
        self.cuda = self.device == "cuda"
        extra = {"MEGAWAN_KERNELS": "triton"} if self.cuda else {}  # our Triton kernels, forward and backward
        self.env = child_env(self.device, extra)
        self.path = lambda *p: os.path.join(self.work, *p)
        self.state: dict = {}
        self.deadline = time.time() + args.budget if args.budget else None

    def timeout(self, gpu_s: float) -> float:
        """A child's time limit: `gpu_s` (4x on a CPU, slower to start and to step), cut to what is left of
        --budget so that a hang leaves the later phases' outcome, and the JSON, to record."""
        limit = gpu_s if self.cuda else 4 * gpu_s
        if self.deadline is not None:
            left = self.deadline - time.time()
            check(left > 10, f"the --budget of {self.args.budget} s is spent")
            limit = min(limit, left)
        return limit


# ----------------------------------------------------------------------------------------------
# 1-2: data


def phase_clips(run: Run, out: dict) -> None:
    from megawan.data.decoding import open_video
    from megawan.demo.shapes import write_synthetic_dataset
    from megawan.utils.media import read_video

    p = run.plan
    for name, count, seed in (("train", p.clips, 0), ("held_out", p.held_out, 1)):
        manifest = write_synthetic_dataset(run.path("clips", name), count=count, frames=p.frames, height=p.height,
                                           width=p.width, seed=seed)
        rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
        check(len(rows) == count, f"{manifest} lists {len(rows)} clips, expected {count}")
        first = os.path.join(os.path.dirname(manifest), rows[0]["path"])
        container, stream = open_video(first)
        with container:
            codec = stream.codec_context.name
        frames = read_video(first)
        check(codec == "h264", f"{first} is {codec}, expected H.264")
        check(frames.shape == (p.frames, p.height, p.width, 3),
              f"{first} reads back as {frames.shape}, expected {(p.frames, p.height, p.width, 3)}")
        run.state[f"{name}_manifest"] = manifest
        out[f"{name}_clips"] = count
    out["clip"] = p.bucket
    out["megabytes"] = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run.path("clips"))
                                 for f in fs) / 2**20, 2)


def _decode_backend(run: Run) -> tuple:
    """(backend, why): --decode, or by default DALI's GPU decoder ("mixed") where CUDA and DALI are there."""
    from megawan.data import dali

    if run.args.decode != "default":
        return run.args.decode, "asked for"
    if not run.cuda:
        return "pyav", "the default on CPU"
    if dali.dali_available():
        return "dali-gpu", "the default on GPU"
    return "pyav", "DALI is not installed here (nvidia.dali does not import): PyAV decodes instead"


def phase_precompute(run: Run, out: dict) -> None:
    import time

    from megawan.data.precompute import PrecomputeJob, run_precompute
    from megawan.data.store import LatentStore
    from megawan.demo.tiny_assets import write_tiny_encoders

    p = run.plan
    t0 = time.perf_counter()
    enc = write_tiny_encoders(run.path("encoders"))  # random tiny VAE and umT5, a tokenizer of the captions
    out["encoders_seconds"] = round(time.perf_counter() - t0, 2)
    backend, why = _decode_backend(run)
    out["decode_backend"], out["decode_note"] = backend, why
    if backend != "pyav":
        print(f"[e2e]   decoding with {backend} ({why})", flush=True)
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    for name, count in (("train", p.clips), ("held_out", p.held_out)):
        store = run.path(f"{name}.zarr")
        job = PrecomputeJob(manifest=run.state[f"{name}_manifest"], out=store, vae=enc["vae"],
                            vae_config=enc["vae_config"], text_encoder=enc["text_encoder"],
                            text_config=enc["text_config"], tokenizer=enc["tokenizer"], buckets=[p.bucket],
                            decode_workers=4, decode_backend=backend)
        summary = run_precompute(job, device=run.device, progress=False)
        out[f"{name}_clips_per_s"] = round(summary["clips_per_s"], 2)
        if run.cuda:
            out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        skipped = [f"{s['id']}: {s['reason']}" for s in summary["skipped"]]
        check(not skipped, f"precompute ({backend}) skipped {len(skipped)} clip(s): {skipped[:3]}")
        check(summary["store"] == {p.bucket: count},
              f"{store} holds {summary['store']}, expected {count} in {p.bucket}")
        sample = LatentStore.open(store).read(p.bucket, 0)
        z = sample["latents"].float()
        shape = (4, (p.frames - 1) // 4 + 1, p.height // 8, p.width // 8)  # the tiny Wan2.1 VAE: 4 channels, 4x8x8
        check(tuple(z.shape) == shape, f"latents {tuple(z.shape)}, expected {shape}")
        check(bool(torch.isfinite(z).all()) and float(z.std()) > 0, "latents are not finite or are constant")
        out["latent_shape"] = list(shape)
        run.state[f"{name}_store"] = store
    run.state["encoders"] = enc
    if run.cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# 3-4: training

# ----------------------------------------------------------------------------------------------
# 7: the kernels' GPU tests


def phase_kernel_tests(run: Run, out: dict) -> None:
    import re
    import subprocess

    files = ["tests/test_kernels.py", "tests/test_fp8_attention.py"]
    limit = run.timeout(240)
    try:
        # the environment of the `tests` stage: the tests choose MEGAWAN_KERNELS themselves
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT,
                              env=child_env(run.device), capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise E2EError(f"pytest {' '.join(files)} ran past {limit:.0f} s") from None
    with open(run.path("kernel_tests.log"), "w", encoding="utf-8") as f:
        f.write(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    out["summary"] = summary
    out.update({k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)})
    tail = "\n".join(proc.stdout.strip().splitlines()[-30:])
    check(proc.returncode == 0, f"pytest {' '.join(files)} exited {proc.returncode}: {summary}\n{tail}")


# ----------------------------------------------------------------------------------------------


# what the phases import beyond torch (the GPU image has torch, Triton, transformers, sentencepiece, PyYAML and
# safetensors; tools/gpu_session.sh installs the rest from the wheels carried in .whl/)
REQUIRED = {"av": "av", "zarr": "zarr, numcodecs, donfig, google-crc32c", "megatron.core": "megatron-core",
            "diffusers": "diffusers", "transformers": "transformers", "sentencepiece": "sentencepiece",
            "yaml": "pyyaml", "safetensors": "safetensors"}


def missing_packages() -> list:
    import importlib

    missing = []
    for module, wheels in REQUIRED.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # not installed, or a wheel that fails at import
            missing.append(f"{module} ({type(e).__name__}: {e}; wheels: {wheels})")
    return missing


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="tiny clips and model (the CPU run); default on a GPU: "
                                                        "480x832 clips and the 1.3B width")
    ap.add_argument("--decode", default="default", choices=["default", "pyav", "dali-cpu", "dali-gpu", "auto"],
                    help="precompute's decoder; default: dali-gpu on GPU (PyAV where DALI is missing), pyav on CPU")
    ap.add_argument("--work", help="working folder (default: a new temporary one)")
    ap.add_argument("--json", help="write the measurements here (rewritten after every phase)")
    ap.add_argument("--budget", type=float, default=450,
                    help="seconds for the whole run (0: no limit); children are cut to what is left of it")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:  # before any device time is spent on phases that cannot run
        print("[e2e] cannot run, missing:\n  " + "\n  ".join(missing), file=sys.stderr)
        if args.json:
            Report(args.json, {"ok": False, "missing": missing}).write()
        return 2
    plan = TINY if args.tiny else GPU
    run = Run(args, plan)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    facts = {"device": torch.cuda.get_device_name() if run.cuda else "cpu", "torch": torch.__version__,
             "cuda": torch.version.cuda if run.cuda else None, "triton": triton_version,
             "plan": "tiny" if args.tiny else "gpu",
             "sizes": dataclasses.asdict(plan), "work": run.work}
    print(f"[e2e] {facts['device']}, torch {facts['torch']}, {facts['plan']} plan, work folder {run.work}", flush=True)
    report = Report(args.json, facts)

    def stopped(signum, frame):  # the stage's `timeout`: leave no child running and the JSON written
        kill_children()
        report.interrupted(signal.Signals(signum).name)
        os._exit(124)

    signal.signal(signal.SIGTERM, stopped)
    gpu_only = None if run.cuda else "GPU only"
    report.phase("clips", lambda out: phase_clips(run, out))
    report.phase("precompute", lambda out: phase_precompute(run, out), needs=("clips",))
    report.phase("train", lambda out: phase_train(run, out), needs=("precompute",))
    # fp8 and generate need the data and a checkpoint, not every check of the train phase: one GPU lease
    # should tell as much as it can
    report.phase("fp8", lambda out: phase_fp8(run, out), needs=("precompute",),
                 skip=gpu_only and "train.fp8=current runs torch._scaled_mm, which needs a CUDA GPU")
    report.phase("generate", lambda out: phase_generate(run, out), needs=("precompute",))
    report.phase("diffusers", lambda out: phase_diffusers(run, out), needs=("generate",))
    report.phase("kernel_tests", lambda out: phase_kernel_tests(run, out),
                 skip=gpu_only and "GPU only: on CPU, CI runs them through Triton's interpreter")
    ok = report.finish()
    print(f"[e2e] {'all phases passed' if ok else 'FAILED'} in {report.data['total_seconds']} s"
          + (f"; JSON {args.json}" if args.json else ""), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except E2EError as e:
        print(f"[e2e] {e}", file=sys.stderr)
        sys.exit(1)
