"""The EMA sharded like the distributed optimizer (megawan.training.ema), on spawned gloo ranks, fp32 and bf16:

- at DP2 each rank averages half of the model, and the average equals an unsharded EMA of the fp32 main
  weights (reassembled from megatron's own shards) computed alongside, to 1e-6, over several buckets;
- apply() gives every rank the whole averaged weights, restore() the trained ones bit for bit;
- a checkpoint saved at DP2 and resumed at DP1 holds the same average exactly and continues it;
- megatron's non-distributed optimizer: its whole fp32 copies are averaged; without an optimizer the whole
  parameters are (the fallback generation and tests use).
"""

import dataclasses
import os

import torch

from megawan.config import DiTConfig, ParallelConfig, dit_preset
from megawan.models.dit import WanDiT
from megawan.parallel.launch import spawn_local
from megawan.training.ema import EMA

DECAY = 0.7
LATENT = (1, 4, 4)  # 4 tokens with the (1, 2, 2) patch
BUCKET_SIZE = 10_000  # elements: the tiny model's 40k parameters in several DDP buckets (megatron makes one
                      # bucket unless gradient reduction overlaps the backward, as it does here)


def _batch(cfg: DiTConfig, step: int, sample: int) -> dict:
    """Sample `sample` of the global batch of `step`: the same whichever rank draws it."""
    g = torch.Generator().manual_seed(1000 * step + sample)
    return dict(x=torch.randn(1, cfg.in_dim, *LATENT, generator=g), t=torch.rand(1, generator=g) * 1000,
                text=torch.randn(1, 5, cfg.text_dim, generator=g), target=torch.randn(1, cfg.out_dim, *LATENT, generator=g))


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["x"], batch["t"], batch["text"])

    def loss_fn(prediction):
        loss = (prediction.float() - batch["target"]).square().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_fn


def _train_step(ddp, optimizer, cfg, step, samples):
    from megawan.training.schedule import forward_backward

    for chunk in ddp:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    micro = [_batch(cfg, step, s) for s in samples]
    forward_backward(ddp, _forward_step, [iter(micro)], len(micro), tokens=4, micro_batch_size=1)
    stepped, _, _ = optimizer.step()
    return stepped


def _main_weights(chunks, optimizer) -> dict:
    """The fp32 main weights as whole tensors, from megatron's own shards and ranges (not the EMA's code):
    each rank fills the ranges its optimizer owns, a sum over DP assembles them."""
    from megatron.core import parallel_state as ps

    owned = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for models, mains in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                              (opt.model_fp32_groups, opt.shard_fp32_groups)):
            for model_group, main_group in zip(models, mains):
                for param, main in zip(model_group, main_group):
                    owned[param] = (opt._get_model_param_range_map(param)["param"], main)
    out = {}
    for name, param in chunks[0].named_parameters():
        whole = torch.zeros(param.numel())
        if param in owned:
            r, main = owned[param]
            whole[r.start:r.end] = main.detach()
        torch.distributed.all_reduce(whole, group=ps.get_data_parallel_group())
        out[name] = whole.view(param.shape)
    return out


def _run(setup: dict, precision: str, root: str, steps: range, resume: bool) -> dict:
    from megatron.core import parallel_state as ps

    from megawan.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megawan.models.dit.parallelize import build_model_chunks, chunk_state_dict
    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.training import optimizer as optim

    bf16 = precision == "bf16"
    cfg = DiTConfig(**{**setup["config"], "params_dtype": "bfloat16" if bf16 else "float32"})
    dtype = torch.bfloat16 if bf16 else torch.float32
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    # several gradient buckets (megatron makes one unless the reduction overlaps): the EMA keeps one piece each
    overlap = optim.Overlap(grad_reduce=True, bucket_size=BUCKET_SIZE)
    with megatron_cpu_mode():
        chunks = build_model_chunks(cfg, ParallelConfig())
        chunks[0].load_state_dict(chunk_state_dict({k: v.to(dtype) if torch.is_tensor(v) else v for k, v in setup["state_dict"].items()}, chunks[0]))
        ddp = optim.wrap_data_parallel(chunks, distributed_optimizer=True, overlap=overlap)
        optimizer = optim.build_optimizer(ddp, lr=1e-2, weight_decay=0.1, bf16=bf16)
        ema = EMA(chunks, DECAY, optimizer)
        out = {"numel": ema.numel, "buckets": sum(len(c.buffers[0].buckets) for c in ddp)}
        if resume:
            load_checkpoint(latest_checkpoint(root), chunks, optimizer, ema)
            out["loaded"] = {n: t.clone() for n, t in _named(chunks, ema.shards.whole_tensors(gather=True)).items()}
            reference = torch.load(os.path.join(root, "reference.pt"))
        else:
            reference = {n: w.clone() for n, w in _main_weights(chunks, optimizer).items()}
        for step in steps:
            # the global batch is samples 0 and 1: one per DP rank at DP2, both (two micro-batches) at DP1
            assert _train_step(ddp, optimizer, cfg, step, range(dp_rank, 2, dp))
            ema.update()
            for name, main in _main_weights(chunks, optimizer).items():
                reference[name].lerp_(main, 1 - DECAY)
        out["ema"] = {n: t.clone() for n, t in _named(chunks, ema.shards.whole_tensors(gather=True)).items()}
        out["reference"] = reference
        before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
        ema.apply()
        out["applied"] = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
        ema.restore()
        out["restored_exactly"] = all(torch.equal(p, before[n]) for n, p in chunks[0].named_parameters())
        out["dtype"] = next(chunks[0].parameters()).dtype
        if not resume:
            save_checkpoint(root, steps.stop, chunks, optimizer, {"step": steps.stop}, {}, ema=ema)
            if torch.distributed.get_rank() == 0:
                torch.save(reference, os.path.join(root, "reference.pt"))
    return out


def _named(chunks, by_param: dict) -> dict:
    return {name: by_param[p] for name, p in chunks[0].named_parameters()}


def _worker(rank, setup_path, root, out_dir, steps, resume):
    setup = torch.load(setup_path)
    results = {p: _run(setup, p, os.path.join(root, p), steps, resume) for p in ("fp32", "bf16")}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _check_run(result: dict, total: int, dp: int) -> None:
    assert result["buckets"] > 1
    assert abs(result["numel"] - total / dp) <= 0.01 * total  # the buckets' padding apart
    for name, ref in result["reference"].items():
        torch.testing.assert_close(result["ema"][name], ref, rtol=1e-6, atol=1e-6, msg=name)
        # every rank gets the whole average, cast as the optimizer casts its main weights
        assert torch.equal(result["applied"][name], result["ema"][name].to(result["dtype"])), name
    assert result["restored_exactly"]


def test_sharded_ema_follows_the_main_weights_and_resumes_at_another_dp_size(tmp_path):
    cfg = dit_preset("tiny")
    torch.manual_seed(0)
    model = WanDiT(cfg)
    setup = {"config": dataclasses.asdict(cfg), "state_dict": model.state_dict()}
    torch.save(setup, tmp_path / "setup.pt")
    total = sum(p.numel() for p in model.parameters())
    root, dp2, dp1 = tmp_path / "run", tmp_path / "dp2", tmp_path / "dp1"
    dp2.mkdir(), dp1.mkdir()

    spawn_local(_worker, world_size=2, args=(str(tmp_path / "setup.pt"), str(root), str(dp2), range(0, 3), False))
    ranks = [torch.load(dp2 / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for precision in ("fp32", "bf16"):
        for r in ranks:
            _check_run(r[precision], total, dp=2)
        assert ranks[0][precision]["numel"] + ranks[1][precision]["numel"] == total  # each element once

    spawn_local(_worker, world_size=1, args=(str(tmp_path / "setup.pt"), str(root), str(dp1), range(3, 5), True))
    resumed = torch.load(dp1 / "rank0.pt", weights_only=False)
    for precision in ("fp32", "bf16"):
        saved = ranks[0][precision]["ema"]
        assert all(torch.equal(resumed[precision]["loaded"][n], t) for n, t in saved.items())  # resharded exactly
        _check_run(resumed[precision], total, dp=1)


def _non_distributed(rank, setup_path, out_dir):
    """bf16 with megatron's non-distributed optimizer: every rank averages its whole fp32 copies."""
    from megawan.models.dit.parallelize import build_model_chunks
    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.training.optimizer import build_optimizer, wrap_data_parallel

    cfg = DiTConfig(**{**torch.load(setup_path)["config"], "params_dtype": "bfloat16"})
    with megatron_cpu_mode():
        chunks = build_model_chunks(cfg, ParallelConfig())
        ddp = wrap_data_parallel(chunks, distributed_optimizer=False)
        optimizer = build_optimizer(ddp, lr=1e-2, distributed_optimizer=False, bf16=True)
        ema = EMA(chunks, DECAY, optimizer)
        inner = getattr(optimizer, "chained_optimizers", [optimizer])[0]  # megatron returns a ChainedOptimizer
        copies = {p: m for models, mains in zip(inner.float16_groups, inner.fp32_from_float16_groups)
                  for p, m in zip(models, mains)}
        reference = {p: m.detach().clone() for p, m in copies.items()}
        for step in range(2):
            assert _train_step(ddp, optimizer, cfg, step, range(2))
            ema.update()
            for p, main in copies.items():
                reference[p].lerp_(main.detach(), 1 - DECAY)
        averages = ema.shards.whole_tensors(gather=False)
        before = [p.detach().clone() for p in chunks[0].parameters()]
        ema.apply()
        applied = all(torch.equal(p, averages[p].to(p.dtype)) for p in chunks[0].parameters())
        ema.restore()
        restored = all(torch.equal(p, b) for p, b in zip(chunks[0].parameters(), before))
    error = max((averages[p] - ref).abs().max().item() for p, ref in reference.items())
    torch.save(dict(numel=ema.numel, covered=len(copies), error=error, applied=applied, restored=restored),
               os.path.join(out_dir, "rank0.pt"))


def test_a_non_distributed_optimizer_averages_its_whole_fp32_copies(tmp_path):
    cfg = dit_preset("tiny")
    model = WanDiT(cfg)
    torch.save({"config": dataclasses.asdict(cfg)}, tmp_path / "setup.pt")
    spawn_local(_non_distributed, world_size=1, args=(str(tmp_path / "setup.pt"), str(tmp_path)))
    result = torch.load(tmp_path / "rank0.pt")
    assert result["numel"] == sum(p.numel() for p in model.parameters())
    assert result["covered"] == len(list(model.parameters()))
    assert result["error"] <= 1e-6 and result["applied"] and result["restored"]


def test_without_an_optimizer_the_whole_weights_are_averaged():
    """A plain bf16 module: the average of its weights in fp32; apply() / restore() swap them exactly."""
    torch.manual_seed(0)
    model = WanDiT(dit_preset("tiny", params_dtype="bfloat16"))
    ema = EMA([model], 0.5)
    start = {n: p.detach().float() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ema.numel == sum(p.numel() for p in model.parameters())
    ema.apply()
    for n, p in model.named_parameters():
        expected = (start[n] + 0.5 * (trained[n].float() - start[n])).to(torch.bfloat16)
        assert torch.equal(p, expected), n
    ema.restore()
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
