#!/usr/bin/env python3
"""How long a checkpoint holds up the training loop, synchronous against background (checkpoint.async_save), in
the same run: 2 gloo ranks, a DiT built like the trainer builds it (megatron's DDP + distributed optimizer, EMA,
fp32), wide enough that the checkpoint is a few hundred MB.

    python tools/bench_checkpoint.py --out docs/benchmarks/cpu-checkpoint-stall.json
    python tools/bench_checkpoint.py --dim 1024 --layers 2 --saves 3 --steps-between 3

Each mode trains `--steps-between` steps between saves, `--saves` times (after one warm-up save that is not
counted: it starts megatron's result-queue manager). Per save it reports, as the slowest rank saw it:
- `in_call_s`: the save call itself (sync: plan, write, checksums, rename, `latest`; async: plan, snapshot copy
  and fork of the writer);
- `finalize_s` (async): the per-step commit calls (the all-reduce asking whether the writers are done, then
  the commit: metadata, manifests with checksums, rename, `latest`);
- `loop_overhead_s`: the wall time of the whole save interval minus that many plain training steps (measured
  first): what the step loop lost to the checkpoint, including the background writer's share of the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LATENT = (1, 4, 4)


def _batch(cfg, step: int, sample: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + sample)
    return dict(x=torch.randn(1, cfg.in_dim, *LATENT, generator=g), t=torch.rand(1, generator=g) * 1000,
                text=torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
                target=torch.randn(1, cfg.out_dim, *LATENT, generator=g))


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["x"], batch["t"], batch["text"])

    def loss_fn(prediction):
        loss = (prediction.float() - batch["target"]).square().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_fn


def _worker(rank: int, args: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from megawan import checkpoint as ckpt
    from megawan.config import ParallelConfig, dit_preset
    from megawan.models.dit.parallelize import build_model_chunks
    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.training import optimizer as optim
    from megawan.training.ema import EMA
    from megawan.training.schedule import forward_backward

    torch.set_num_threads(1)
    cfg = dit_preset("tiny", dim=args["dim"], ffn_dim=4 * args["dim"], num_heads=args["dim"] // 64,
                     num_layers=args["layers"])
    with megatron_cpu_mode():
        torch.manual_seed(0)
        chunks = build_model_chunks(cfg, ParallelConfig())
        ddp = optim.wrap_data_parallel(chunks, distributed_optimizer=True)
        optimizer = optim.build_optimizer(ddp, lr=1e-4)
        ema = EMA(chunks, 0.99, optimizer)
        step = 0

        def train():
            nonlocal step
            step += 1
            for chunk in ddp:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            micro = [_batch(cfg, step, rank)]
            forward_backward(ddp, _forward_step, [iter(micro)], 1, tokens=4, micro_batch_size=1)
            optimizer.step()
            ema.update()

        def slowest(seconds: float) -> float:
            t = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.item()

        train()  # Adam's state exists from here on
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args["steps_between"] * 2):
            train()
        step_s = slowest(time.perf_counter() - start) / (args["steps_between"] * 2)

        results = {"step_s": step_s, "params": sum(p.numel() for p in chunks[0].parameters())}
        for mode in ("sync", "async"):
            root = os.path.join(args["root"], mode)
            saver = ckpt.CheckpointSaver(async_save=mode == "async")
            saves = []
            for i in range(args["saves"] + 1):
                dist.barrier()
                begin = time.perf_counter()
                saver.save(root, step, chunks, optimizer, {"step": step}, {}, ema=ema, keep=2)
                in_call = time.perf_counter() - begin
                finalize = 0.0
                for _ in range(args["steps_between"]):
                    train()
                    t = time.perf_counter()
                    saver.finalize()
                    finalize += time.perf_counter() - t
                if i == args["saves"]:
                    t = time.perf_counter()
                    saver.close()
                    finalize += time.perf_counter() - t
                interval = time.perf_counter() - begin
                if i:  # the first save starts megatron's result-queue manager process: warm-up
                    saves.append({"in_call_s": slowest(in_call), "finalize_s": slowest(finalize),
                                  "loop_overhead_s": slowest(interval - args["steps_between"] * step_s)})
                else:
                    slowest(0.0), slowest(0.0), slowest(0.0)
            folder = ckpt.latest_checkpoint(root)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
            results[mode] = {"saves": saves, "checkpoint_mb": size / 2**20}
        if rank == 0:
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump(results, f)


def main(argv=None) -> dict:
    from megawan.parallel.launch import spawn_local

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--saves", type=int, default=3, help="counted saves per mode (after one warm-up save)")
    p.add_argument("--steps-between", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args(argv)
    work = a.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    args = {"dim": a.dim, "layers": a.layers, "saves": a.saves, "steps_between": a.steps_between,
            "root": os.path.join(work, "ckpt")}
    start = time.perf_counter()
    try:
        spawn_local(_worker, world_size=2, args=(args, work))
        with open(os.path.join(work, "result.json")) as f:
            r = json.load(f)
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    def summary(mode):
        saves = r[mode]["saves"]
        return {k: statistics.median(s[k] for s in saves) for k in saves[0]}

    sync, asyn = summary("sync"), summary("async")
    report = {
        "what": "seconds the training loop is held up per checkpoint, 2 gloo ranks (DP2, distributed optimizer, "
                "EMA, fp32), medians over the counted saves, slowest rank",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "model": {"dim": a.dim, "layers": a.layers, "params": r["params"]},
        "checkpoint_mb": round(r["sync"]["checkpoint_mb"], 1),
        "step_s": round(r["step_s"], 4),
        "steps_between_saves": a.steps_between,
        "sync": {k: round(v, 4) for k, v in sync.items()},
        "async": {k: round(v, 4) for k, v in asyn.items()},
        "blocked_ratio_async_over_sync": round((asyn["in_call_s"] + asyn["finalize_s"]) / sync["in_call_s"], 3),
        "loop_overhead_ratio_async_over_sync": round(asyn["loop_overhead_s"] / max(sync["loop_overhead_s"], 1e-9), 3),
        "per_save": {"sync": r["sync"]["saves"], "async": r["async"]["saves"]},
        "bench_seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
