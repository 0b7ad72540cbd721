"""The tiny end-to-end job on CPU (the largest real path so far): a tiny Wan DiT trained for a few steps
on 2 tensor-parallel ranks over gloo, checkpointed with dist_checkpointing, then reloaded on ONE rank,
which must compute the same velocity as the two ranks did.

    megawan demo --out runs/demo
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from megawan.checkpointing import load_model, save_model
from megawan.config import DiTConfig, dit_preset
from megawan.models.dit import WanDiT, flops
from megawan.parallel.launch import spawn_local


def _batch(cfg: DiTConfig, seed: int):
    """A fixed toy batch: clean latents x0, noise, timesteps and text states (stand-ins for VAE / umT5)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, cfg.in_dim, 5, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 12, cfg.text_dim, generator=g)
    return x0, noise, t, text


def _train_tp(rank: int, cfg_dict: dict, out_dir: str, steps: int) -> None:
    from megatron.core import parallel_state

    torch.manual_seed(0)
    cfg = DiTConfig(**cfg_dict)
    model = WanDiT(cfg)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    local = sum(p.numel() for p in model.parameters())
    say(f"[demo] {cfg.name} DiT, {cfg.num_layers} blocks, dim {cfg.dim}, {cfg.num_heads} heads, "
        f"TP={tp}: {local:,} parameters on each rank")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x0, noise, t, text = _batch(cfg, seed=1)
    # rectified flow: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    step_flops = 3 * flops(cfg, 2, 5, 8, 8)
    for step in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x_t, t * 1000, text), noise - x0)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        say(f"[demo] step {step + 1}/{steps}  loss {loss.item():.4f}  {elapsed * 1000:.0f} ms  "
            f"{step_flops / elapsed / 1e9:.2f} model GFLOP/s")
    ckpt = save_model(model, os.path.join(out_dir, "checkpoint"))
    say(f"[demo] saved TP={tp} checkpoint (megatron-core dist_checkpointing) to {ckpt}")
    with torch.no_grad():
        v = model(x_t, t * 1000, text)
    if rank == 0:
        torch.save(v, os.path.join(out_dir, f"velocity_tp{tp}.pt"))


def _reload_single(rank: int, cfg_dict: dict, out_dir: str) -> None:
    cfg = DiTConfig(**cfg_dict)
    model = WanDiT(cfg)
    load_model(model, os.path.join(out_dir, "checkpoint"))
    x0, noise, t, text = _batch(cfg, seed=1)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    with torch.no_grad():
        torch.save(model(x_t, t * 1000, text), os.path.join(out_dir, "velocity_tp1.pt"))


def run_demo(out_dir: str = "runs/demo", preset: str = "tiny", tensor_parallel: int = 2, steps: int = 5) -> dict:
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "checkpoint")):
        raise FileExistsError(f"{out_dir}/checkpoint exists: choose another --out or remove it")
    cfg = dit_preset(preset, num_heads=max(2, tensor_parallel)).validate(tensor_parallel=tensor_parallel)
    cfg_dict = dataclasses.asdict(cfg)
    start = time.perf_counter()
    print(f"[demo] training on {tensor_parallel} CPU ranks (gloo), tensor parallel {tensor_parallel}")
    spawn_local(_train_tp, world_size=tensor_parallel, tensor_parallel=tensor_parallel, args=(cfg_dict, out_dir, steps))
    print("[demo] reloading the checkpoint on a single rank (TP=1)")
    spawn_local(_reload_single, world_size=1, tensor_parallel=1, args=(cfg_dict, out_dir))
    v_tp = torch.load(os.path.join(out_dir, f"velocity_tp{tensor_parallel}.pt"))
    v_1 = torch.load(os.path.join(out_dir, "velocity_tp1.pt"))
    rel = ((v_tp - v_1).abs().max() / v_1.abs().max()).item()
    summary = {
        "preset": preset, "tensor_parallel": tensor_parallel, "steps": steps,
        "checkpoint": os.path.join(out_dir, "checkpoint"),
        "tp_vs_single_rank_max_rel_diff": rel,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[demo] TP={tensor_parallel} vs one rank after reload: max|d|/max|v| = {rel:.2e}")
    print(f"[demo] done in {summary['seconds']} s; summary in {out_dir}/summary.json")
    if rel > 1e-5:
        raise RuntimeError(f"TP={tensor_parallel} and single-rank outputs differ by {rel:.2e}")
    return summary
