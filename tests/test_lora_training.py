"""LoRA fine-tuning (the run's `lora:` section): one optimizer step with adapters under TP2 x SP x PP2 x CP2 gives
the single-rank adapters; only the adapters get gradient buffers, fp32 main weights and Adam state, and the base
stays bit-identical; `megawan train` with lora.rank writes adapter-only checkpoints, resumes exactly and refuses
another base; configs that cannot work are refused before any rank starts."""

import dataclasses
import os
import shutil
import sys
import zlib

import pytest
import torch
from test_parallel_training_step import LATENT, MICRO_BATCH_SIZE, train_step
from training_runs import CONFIG, losses, run
from wan_reference import diffusers_dit

from torch.distributed.checkpoint import FileSystemReader

from megawan.checkpoint import (CheckpointTensors, is_lora_checkpoint, read_trainer_state, save_model_checkpoint,
                                weights_fingerprint)
from megawan.config import ConfigError, DiTConfig, ParallelConfig, dit_preset, load_config
from megawan.convert import convert_state_dict
from megawan.diffusion import FlowMatching
from megawan.lora import adapters, apply_lora, read_lora_file
from megawan.models.dit.parallelize import build_model_chunks, chunk_state_dict
from megawan.parallel.cpu_compat import megatron_cpu_mode
from megawan.parallel.launch import spawn_local

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402  (tools/ is not a package)

RANK, ALPHA = 4, 8.0
LAYOUTS = {8: dict(tensor_parallel=2, sequence_parallel=True, pipeline_parallel=2, context_parallel=2),  # by world
           2: dict(tensor_parallel=2)}


def _perturb(chunk):
    """Non-zero B (lora init leaves it 0), so that A gets a gradient too: drawn whole per adapter, then cut like B."""
    for name, a in adapters(chunk):
        b = torch.randn(a.out_features, a.rank, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        if a.mode == "column" and a.tp_group is not None:
            b = b.chunk(a.tp_group.size(), dim=0)[a.tp_group.rank()]
        a.lora_B.data.copy_(0.05 * b)


def _optimizer_facts(optimizer, chunks, ddp):
    """What megatron's DDP and distributed optimizer hold: whether the parameters with a gradient buffer are the
    adapters, how many model parameters the optimizer updates, its fp32 main elements and Adam-state elements
    (over the DP x CP group, which the distributed optimizer shards them over)."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    buffered = {id(p) for d in ddp for b in d.buffers for p in b.param_index_map}
    names = {id(p): f"{i}.{n}" for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    updated = [None] * group.size()
    torch.distributed.all_gather_object(updated, {names[id(p)] for o in opts
                                                  for g in o.model_float16_groups + o.model_fp32_groups for p in g},
                                        group=group)
    main = sum(m.numel() for o in opts for g in o.shard_fp32_from_float16_groups + o.shard_fp32_groups for m in g)
    state = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for o in opts for s in o.optimizer.state.values())
    counts = torch.tensor([main, state])
    torch.distributed.all_reduce(counts, group=group)
    adapter_params = [p for c in chunks for _, a in adapters(c) for p in (a.lora_A, a.lora_B)]
    return dict(buffered_are_adapters=buffered == {id(p) for p in adapter_params}, updated=len(set().union(*updated)),
                adapted_linears=sum(1 for c in chunks for _ in adapters(c)),
                main=int(counts[0]), state=int(counts[1]), adapter_numel=sum(p.numel() for p in adapter_params),
                frozen_without_grad=all(not hasattr(p, "main_grad") and p.grad is None and not p.requires_grad
                                        for c in chunks for n, p in c.named_parameters() if "_lora." not in n))


def _lora_step(rank, setup_path, out_dir):
    from megatron.core import parallel_state as ps

    from megawan.training.optimizer import build_optimizer, wrap_data_parallel

    setup = torch.load(setup_path, weights_only=False)
    cfg = DiTConfig(**setup["config"])
    layout = setup["layouts"][torch.distributed.get_world_size()]
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    full = setup["state_dict"]
    shard = convert_state_dict(full, "megawan", "megawan", cfg, tp_size=tp)[tp_rank] if tp > 1 else full
    with megatron_cpu_mode():
        chunks = build_model_chunks(cfg, ParallelConfig(**layout))
        for chunk in chunks:
            chunk.load_state_dict(chunk_state_dict(shard, chunk))
            apply_lora(chunk, RANK, alpha=ALPHA)  # the trainer's call: the model's init seed, every block linear
            _perturb(chunk)
        base = [{n: p.detach().clone() for n, p in c.named_parameters() if "_lora." not in n} for c in chunks]
        ddp = wrap_data_parallel(chunks, distributed_optimizer=True)
        optimizer = build_optimizer(ddp, lr=1e-3, weight_decay=0.1, clip_grad=1.0)
        losses_, grad_norm = train_step(ddp, optimizer, setup["microbatches"], setup["tokens"], MICRO_BATCH_SIZE)
    facts = _optimizer_facts(optimizer, chunks, ddp)
    facts["base_unchanged"] = all(torch.equal(p, base[i][n]) for i, c in enumerate(chunks)
                                  for n, p in c.named_parameters() if "_lora." not in n)
    params, axes = {}, {}
    for chunk in chunks:
        for name, a in adapters(chunk):
            for which in ("lora_A", "lora_B"):
                params[f"{name}.{which}"] = getattr(a, which).detach().clone()
                split = a.tp_group is not None and (a.mode, which) in (("row", "lora_A"), ("column", "lora_B"))
                axes[f"{name}.{which}"] = (1 if which == "lora_A" else 0) if split else None
    torch.save(dict(losses=losses_, grad_norm=float(grad_norm), params=params, axes=axes, tp_rank=tp_rank,
                    facts=facts), f"{out_dir}/rank{rank}.pt")


def test_lora_step_under_tp2_pp2_cp2_and_sp_equals_one_rank_and_trains_only_the_adapters(tmp_path):
    cfg = dit_preset("tiny", num_heads=4, num_layers=2)
    g, flow = torch.Generator().manual_seed(0), FlowMatching(shift=3.0)
    microbatches = []
    for _ in range(2):
        x0 = torch.randn(MICRO_BATCH_SIZE, cfg.in_dim, *LATENT, generator=g)
        t = flow.sample_timesteps(MICRO_BATCH_SIZE, generator=g)
        x_t, target = flow.noised(x0, torch.randn(x0.shape, generator=g), t)
        microbatches.append(dict(x_t=x_t, timestep=flow.model_timesteps(t), target=target,
                                 text=torch.randn(MICRO_BATCH_SIZE, 7, cfg.text_dim, generator=g)))
    path = tmp_path / "setup.pt"
    torch.save(dict(config=dataclasses.asdict(cfg), microbatches=microbatches, tokens=3 * 2 * 3,
                    layouts={1: {}, **LAYOUTS},
                    state_dict=convert_state_dict(diffusers_dit(cfg).state_dict(), "diffusers", "megawan", cfg)), path)
    results = {}
    for world, parallel in ((1, {}), *LAYOUTS.items()):
        (tmp_path / str(world)).mkdir()
        spawn_local(_lora_step, world_size=world, args=(str(path), str(tmp_path / str(world))), **parallel)
        results[world] = [torch.load(tmp_path / str(world) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    ref = results[1][0]
    assert ref["facts"]["adapted_linears"] == 2 * 10  # 2 blocks x (q, k, v, o of both attentions, 2 FFN layers)
    for world in LAYOUTS:
        _assert_same_step(results[world], ref, LAYOUTS[world])


def _assert_same_step(ranks, ref, layout):

    for facts in [ref["facts"]] + [r["facts"] for r in ranks]:
        assert facts["buffered_are_adapters"] and facts["frozen_without_grad"] and facts["base_unchanged"], facts
        assert facts["updated"] == 2 * facts["adapted_linears"] > 0, facts  # A and B of each adapted linear
        assert facts["main"] == facts["adapter_numel"] and facts["state"] == 2 * facts["adapter_numel"], facts

    last = [r["losses"] for r in ranks if r["losses"]][0]
    torch.testing.assert_close(torch.tensor(last), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    assert abs(ranks[0]["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"]
    for pname, expected in ref["params"].items():
        pieces = {}
        for r in ranks:
            if pname in r["params"]:
                pieces.setdefault(r["tp_rank"], r["params"][pname])
        assert len(pieces) == 2, f"{layout}: {pname} held by TP ranks {sorted(pieces)}"
        axis = ranks[0]["axes"].get(pname, next(r["axes"][pname] for r in ranks if pname in r["axes"]))
        got = pieces[0] if axis is None else torch.cat([pieces[0], pieces[1]], dim=axis)
        rel = ((got - expected).norm() / expected.norm()).item()
        assert rel <= 1e-5, f"{layout}: updated {pname} differs by {rel:.2e} (relative, in norm)"


# ----------------------------------------------------------------------------------------------
# `megawan train` with lora.rank: adapter-only checkpoints, an exact resume, another base refused


def _tensors(folder):
    """{key: number of elements} of every tensor a checkpoint folder holds (model, optimizer, EMA)."""
    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k: m.size.numel() for k, m in meta.items() if hasattr(m, "size")}


def _write_base(rank, cfg_dict, out):
    """A tiny DiT's random weights as a weights-only checkpoint (what tools/convert_checkpoint.py writes)."""
    cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    with megatron_cpu_mode():
        save_model_checkpoint(out, build_model_chunks(cfg, ParallelConfig()), {"model": cfg_dict}, {"step": 0})


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_store):
    """Two different base checkpoints of the tiny training config's model."""
    model = dataclasses.asdict(load_config(CONFIG, (f"data.store={tiny_store}",)).model)
    out = tmp_path_factory.mktemp("bases")
    for name in ("a", "b"):
        torch.manual_seed(ord(name))
        spawn_local(_write_base, world_size=1, args=(model, str(out / name)))
    return str(out / "a"), str(out / "b")


LORA_RUN = ("train.steps=3", "optimizer.decay_steps=3", "checkpoint.keep=4", "lora.rank=4", "lora.alpha=8",
            "lora.targets=[q,k,v,o]")


def test_lora_run_checkpoints_adapters_only_resumes_exactly_and_refuses_another_base(tiny_store, bases, tmp_path):
    base, other = bases
    ckpt = str(tmp_path / "run")
    code, log = run(2, ckpt, tiny_store, *LORA_RUN, f"checkpoint.init_from={base}")
    assert code == 0, log
    ref = losses(ckpt)
    assert len(ref) == 3 and "LoRA rank 4" in log

    last = os.path.join(ckpt, "iter_0000003")
    assert is_lora_checkpoint(last) and not is_lora_checkpoint(base)
    assert read_trainer_state(last)["lora_base"] == {"path": base, "fingerprint": weights_fingerprint(base)}
    assert weights_fingerprint(base) != weights_fingerprint(other)
    keys = CheckpointTensors(last).keys()
    assert len(keys) == 2 * 4 * 2 * 2  # 2 blocks x q, k, v, o of both attentions x A, B
    assert CheckpointTensors(last).get("blocks.1.self_attention.linear_q_lora.lora_A").shape == (4, 32)  # whole
    saved, base_tensors = _tensors(last), _tensors(base)
    assert all("_lora.lora_" in k for k in saved)  # model, optimizer and EMA tensors: the adapters' alone
    model_numel = sum(n for k, n in saved.items() if k in keys)
    assert model_numel * 4 < sum(base_tensors.values())  # tiny model, rank 4 on 8 of 10 linears: about 1/7

    # the trained adapters as the files diffusers / ComfyUI load (tests/test_lora_files.py samples such files)
    for fmt in ("diffusers", "comfyui"):
        out = str(tmp_path / f"trained-{fmt}.safetensors")
        assert convert_main(["--src", last, "--src-format", "megawan", "--lora-out", out, "--lora-format", fmt]) == 0
        lora = read_lora_file(out)
        assert len(lora) == len(keys) // 2 and {t.alpha for t in lora.values()} == {ALPHA}
        q = lora["blocks.1.self_attention.linear_q"]
        assert torch.equal(q.A, CheckpointTensors(last).get("blocks.1.self_attention.linear_q_lora.lora_A"))
        assert torch.equal(q.B, CheckpointTensors(last).get("blocks.1.self_attention.linear_q_lora.lora_B"))

    # a run stopped after its checkpoint of step 2 (the later one gone, as after a kill), then the same command
    resumed = str(tmp_path / "resumed")
    shutil.copytree(ckpt, resumed, ignore=shutil.ignore_patterns("iter_0000003"))
    with open(os.path.join(resumed, "latest"), "w") as f:
        f.write("iter_0000002\n")
    code, log = run(2, resumed, tiny_store, *LORA_RUN, f"checkpoint.init_from={base}")
    assert code == 0 and "at step 2" in log, log
    assert losses(resumed) == ref  # bit for bit: the base reloaded, the adapters and their Adam state restored

    code, log = run(1, resumed, tiny_store, *LORA_RUN, "train.steps=4", "parallel.tensor_parallel=1",
                    f"checkpoint.init_from={other}")
    assert code != 0
    assert "is not the base the LoRA checkpoint" in log and weights_fingerprint(base) in log, log
    assert weights_fingerprint(other) in log, log


# ----------------------------------------------------------------------------------------------
# Refused before any rank starts


def test_lora_configs_that_cannot_work_are_refused_before_training(tiny_store, bases):
    from megawan.training.trainer import preflight

    def refused(*overrides):
        with pytest.raises(ConfigError) as e:
            preflight(load_config(CONFIG, (f"data.store={tiny_store}", *overrides)), world_size=2)
        return str(e.value)

    assert refused("lora.rank=4").startswith("lora.rank")  # no base weights to train on
    assert refused("lora.rank=4", f"checkpoint.init_from={bases[0]}", "lora.targets=[q,qkv]").startswith(
        "lora.targets: 'qkv'")
    assert refused("lora.rank=4", f"checkpoint.init_from={bases[0]}", "lora.targets=[k_img]").startswith(
        "lora.targets: 'k_img'")  # a text-to-video model has no image branch
    assert refused("lora.rank=4", f"checkpoint.init_from={bases[0]}", "lora.init_from=/nonexistent.safetensors") \
        .startswith("lora.init_from")
