"""tools/gpu_e2e.py's training phases: `megawan train` killed mid-run and resumed (phase 3), and a short FP8
run (phase 4). `run` is gpu_e2e's Run: the plan, the device, the folders and what earlier phases handed on."""

from __future__ import annotations

import json
import math
import os
import time

from e2e_support import Child, check, run_cli


def train_config(run, ckpt: str, steps: int, validation: bool, ema: float) -> dict:
    p = run.plan
    enc = run.state["encoders"]
    return {
        "model": dict(p.model),
        "data": {"store": run.state["train_store"], "video_ratio": 1.0, "global_batch_size": p.batch,
                 "micro_batch_size": p.micro_batch, "num_workers": 2},
        "optimizer": {"lr": p.lr, "min_lr": p.lr / 10, "warmup_steps": 2, "decay": "cosine"},
        "train": {"steps": steps, "precision": p.precision, "shift": 3.0, "ema_decay": ema, "text_dropout": 0.1,
                  "log_every": 1},
        "checkpoint": {"dir": ckpt, "every": p.checkpoint_every, "keep": 2},
        "logging": {"progress": False, "tensorboard": False},
        "validation": ({"every": steps, "store": run.state["held_out_store"], "num_samples": p.held_out,
                        "batch_size": p.held_out, "sampler": "unipc", "steps": p.val_steps, "shift": 3.0,
                        "guidance": 3.0, "vae": enc["vae"]} if validation else {"every": 0}),
    }


def _write_yaml(path: str, config: dict) -> str:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def _metrics(ckpt: str) -> list:
    """The rows of a run's metrics.jsonl; a line cut short (read while written, or by the kill) is left out."""
    rows = []
    path = os.path.join(ckpt, "logs", "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def latest_step(ckpt: str):
    pointer = os.path.join(ckpt, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        return int(f.read().strip().split("_")[1])  # iter_0000004


def _losses(rows: list) -> dict:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _finite(values) -> bool:
    """metrics.jsonl writes a NaN or infinite loss as null."""
    return all(v is not None and math.isfinite(v) for v in values)


def phase_train(run, out: dict) -> None:
    p = run.plan
    ckpt = run.state["ckpt"] = run.path("run", "checkpoints")  # generation samples it even if a check below fails
    config = _write_yaml(run.path("train.yaml"), train_config(run, ckpt, p.steps, validation=True, ema=p.ema))
    args = ["train", "--config", config]

    # the first run: SIGKILL once a checkpoint exists and a later step has been logged (mid-run, as a node dies)
    def checkpointed_and_past_it() -> bool:
        step = latest_step(ckpt)
        return step is not None and any(r.get("step", 0) > step for r in _metrics(ckpt))

    t0 = time.perf_counter()
    child = Child(args, run.path("train_killed.log"), run.env)
    code = child.wait(run.timeout(240), kill_when=checkpointed_and_past_it)
    out["killed_run_seconds"] = round(time.perf_counter() - t0, 2)
    check(code == -9, f"the first training run was to be SIGKILLed mid-run but exited with {code} "
                      f"(latest checkpoint: step {latest_step(ckpt)}); tail:\n{child.tail()}")
    before = _metrics(ckpt)
    resumed_from = out["resumed_from_step"] = latest_step(ckpt)
    out["killed_after_step"] = max(r["step"] for r in before)
    check(resumed_from is not None and 0 < resumed_from < p.steps,
          f"after the kill the latest checkpoint is step {resumed_from}, expected one in 1..{p.steps - 1}")

    t0 = time.perf_counter()
    child = run_cli(args, run.path("train_resumed.log"), run.env, run.timeout(300))
    out["resumed_run_seconds"] = round(time.perf_counter() - t0, 2)
    if run.cuda:
        out["peak_gpu_gb"] = child.peak_gb()
    log = child.text()
    check(f"at step {resumed_from}" in log and "resumed from" in log,
          f"the second run did not report resuming at step {resumed_from}; tail:\n{child.tail()}")
    # the resumed run dropped the rows the killed run logged after its checkpoint (each step is logged once):
    # the rows past the checkpoint's step are the resumed run's
    after = [r for r in _metrics(ckpt) if r.get("step", 0) > resumed_from]
    train_rows = [r for r in after if "loss" in r]
    old, new = _losses(before), _losses(after)
    losses = {**old, **new}
    out.update(first_loss=losses.get(1), last_loss=losses.get(p.steps),
               final_step=train_rows[-1]["step"] if train_rows else None, losses=[losses[s] for s in sorted(losses)],
               step_seconds_median=_median([r["step_seconds"] for r in after if "step_seconds" in r]))
    memory = [r["memory_gb"] for r in before + after if r.get("memory_gb") is not None]
    if run.cuda and memory:
        out["peak_gpu_gb_logged"] = round(max(memory), 3)  # the trainer's own memory_gb (max_memory_allocated)
    check(train_rows and train_rows[0]["step"] == resumed_from + 1,
          f"the resumed run's first logged step is {train_rows[0]['step'] if train_rows else None}, "
          f"expected {resumed_from + 1}")
    check(train_rows[-1]["step"] == p.steps and latest_step(ckpt) == p.steps,
          f"the resumed run ended at step {train_rows[-1]['step']} (latest checkpoint {latest_step(ckpt)}), "
          f"expected {p.steps}")
    check(_finite(old.values()) and _finite(new.values()), f"non-finite losses: killed run {old}, resumed {new}")
    # steps the killed run had logged past its checkpoint, run again from the same state: the same losses
    # (bit for bit on CPU; on GPU within bf16 kernels' run-to-run differences)
    redone = sorted(s for s in old if s > resumed_from and s in new)
    worst = max((abs(new[s] - old[s]) / max(abs(old[s]), 1e-12) for s in redone), default=0.0)
    out.update(relogged_steps=redone, relogged_max_rel_diff=worst)
    check(worst <= (2e-2 if run.cuda else 1e-6),
          f"the resumed run re-logged steps {redone} with losses {[new[s] for s in redone]}, the killed run had "
          f"{[old[s] for s in redone]} (relative difference {worst:.2e})")
    val = [r for r in after if "val/loss" in r]
    check(val and _finite([val[-1]["val/loss"]]), f"no finite validation loss logged: {val}")
    out["val_loss"] = val[-1]["val/loss"]
    out["val_videos"] = _check_validation_videos(run, ckpt)


def _median(values: list):
    return round(sorted(values)[len(values) // 2], 4) if values else None


def _check_validation_videos(run, ckpt: str) -> list:
    from megawan.training.validation import frames_of, read_samples

    p = run.plan
    folder = os.path.join(ckpt, "logs", "validation", f"step-{p.steps:07d}")
    check(os.path.isfile(os.path.join(folder, "samples.jsonl")), f"validation wrote no {folder}/samples.jsonl")
    rows = read_samples(folder)
    check(len(rows) == p.held_out and all("video" in r for r in rows),
          f"validation sampled {len(rows)} videos ({[sorted(r) for r in rows]}), expected {p.held_out}")
    for r in rows:
        frames = frames_of(r)
        check(frames.shape == (p.frames, p.height, p.width, 3),
              f"validation video {r['video']} is {frames.shape}, expected {(p.frames, p.height, p.width, 3)}")
    return [os.path.relpath(r["video"], run.work) for r in rows]


def phase_fp8(run, out: dict) -> None:
    p = run.plan
    ckpt = run.path("run_fp8", "checkpoints")
    config = train_config(run, ckpt, p.fp8_steps, validation=False, ema=0.0)
    config["train"]["fp8"] = "current"
    config["checkpoint"]["every"] = p.fp8_steps
    child = run_cli(["train", "--config", _write_yaml(run.path("train_fp8.yaml"), config)],
                    run.path("train_fp8.log"), run.env, run.timeout(180))
    out["peak_gpu_gb"] = child.peak_gb()
    fp8 = _losses(_metrics(ckpt))
    out["losses"] = [fp8[s] for s in sorted(fp8)]
    check(sorted(fp8) == list(range(1, p.fp8_steps + 1)) and _finite(fp8.values()),
          f"FP8 run: losses {fp8}, expected {p.fp8_steps} finite ones")
    check(latest_step(ckpt) == p.fp8_steps, f"the FP8 run wrote no checkpoint at step {p.fp8_steps}")
    # the same data, noise and initial weights as the bf16 run (whose steps 1..fp8_steps ran before its kill):
    # FP8 products should follow its losses closely
    bf16 = _losses(_metrics(run.state["ckpt"])) if run.state.get("ckpt") else {}
    if all(s in bf16 for s in fp8) and _finite(bf16[s] for s in fp8):
        diff = max(abs(fp8[s] - bf16[s]) / abs(bf16[s]) for s in fp8)
        out["max_rel_diff_to_bf16"] = round(diff, 5)
        check(diff < 0.1, f"FP8 losses {fp8} drift {diff:.1%} from the bf16 run's {[bf16[s] for s in fp8]}")
