"""The activation-memory estimate behind tools/plan_parallel.py equals what a block really saves for its
backward on tiny CPU runs (fp32 and bf16, TP=1 and TP=2), and the planner answers for the 14B model."""

import pytest
import torch

from megawan.config import DiTConfig, dit_preset
from megawan.models.dit import WanDiT
from megawan.models.dit.rope import rope_cos_sin
from megawan.parallel.launch import spawn_local
from megawan.training.memory import activation_bytes_per_block


def saved_activation_bytes(model: WanDiT, tokens: int, text_len: int, dtype) -> int:
    """Bytes of the distinct non-parameter tensors one block saves for backward (RoPE tables excluded:
    they are shared by every block)."""
    cfg = model.dit_config
    block = model.blocks[0]
    x = torch.randn(tokens, 1, cfg.dim, dtype=dtype, requires_grad=True)
    e0 = torch.randn(1, 1, 6, cfg.dim)
    context = torch.randn(text_len, 1, cfg.dim, dtype=dtype)
    rope = rope_cos_sin((tokens, 1, 1), cfg.rope_split)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *rope, e0)}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and t.numel() > cfg.dim * 6:  # per-block constants (modulation rows) are tiny
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, e0, context, rope)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,param_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("dim,ffn,heads,tokens,text_len", [(64, 160, 4, 96, 24), (96, 256, 8, 200, 40)])
def test_estimate_matches_saved_tensors(dtype, param_bytes, dim, ffn, heads, tokens, text_len):
    cfg = dit_preset("tiny", dim=dim, ffn_dim=ffn, num_heads=heads, text_len=text_len,
                     params_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    measured = saved_activation_bytes(WanDiT(cfg), tokens, text_len, dtype)
    estimate = activation_bytes_per_block(cfg, tokens, text_len, tp=1, param_bytes=param_bytes)
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)


def _tp_worker(rank, cfg_dict, out_dir):
    cfg = DiTConfig(**cfg_dict)
    torch.save(saved_activation_bytes(WanDiT(cfg), 96, 24, torch.float32), f"{out_dir}/rank{rank}.pt")


def test_estimate_matches_saved_tensors_at_tp2(tmp_path):
    import dataclasses

    cfg = dit_preset("tiny", dim=64, ffn_dim=160, num_heads=4, text_len=24)
    spawn_local(_tp_worker, world_size=2, tensor_parallel=2, args=(dataclasses.asdict(cfg), str(tmp_path)))
    measured = torch.load(tmp_path / "rank0.pt")
    estimate = activation_bytes_per_block(cfg, 96, 24, tp=2, param_bytes=4)
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)


def test_plan_for_14b_at_720p_on_64_gpus(capsys):
    import sys

    sys.path.insert(0, "tools")
    from plan_parallel import main

    assert main(["--preset", "wan2.1-t2v-14b", "--frames", "81", "--height", "720", "--width", "1280",
                 "--gpus", "64", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "75,600 tokens/sample" in out
    # the first layout listed, as overrides that load into a run config with the same layout
    first_row, pasted = out.splitlines()[2].split(), out.splitlines()[-1].split()
    from megawan.config import load_config

    p = load_config(None, ["model.preset=wan2.1-t2v-14b", *pasted]).parallel
    assert [str(v) for v in (p.tensor_parallel, p.pipeline_parallel, p.context_parallel)] == first_row[:3]
    assert p.data_parallel(64) == int(first_row[3]) and p.recompute == first_row[5]
    # a video size Wan's VAE cannot take is one line naming the flag
    assert main(["--preset", "wan2.1-t2v-14b", "--frames", "80", "--gpus", "8"]) == 2
    assert capsys.readouterr().err.startswith("plan_parallel.py: --frames: 80 video frames")


def test_planner_offloads_the_fewest_blocks_that_make_a_layout_fit():
    """14B at 480p on 16 x 80 GB: TP8 without recompute is short by under two blocks' activations, so the
    planner lists it with 2 blocks offloaded to host memory (and without the offload it would not fit)."""
    import dataclasses
    import sys

    sys.path.insert(0, "tools")
    from plan_parallel import GB, plan

    from megawan.training.memory import estimate_memory

    cfg, tokens, fits, _ = plan("wan2.1-t2v-14b", 81, 480, 832, gpus=16, gpu_memory_gb=80)
    offloaded = [(p, m) for p, m, _ in fits if p.offload_blocks]
    assert offloaded
    parallel, mem = offloaded[0]
    assert parallel.recompute == "none" and mem.host_activations > 0
    budget = 80 * GB * 0.9
    assert mem.total <= budget
    fewer = dataclasses.replace(parallel, offload_blocks=parallel.offload_blocks - 1)
    assert estimate_memory(cfg, fewer, 16, tokens).total > budget


def test_offloaded_blocks_train_the_same():
    """parallel.offload_blocks: the first blocks' saved tensors go through save_on_cpu; gradients are unchanged."""
    from unittest import mock

    from megawan.models.dit import parallelize

    cfg = dit_preset("tiny", in_dim=4, out_dim=4)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 7, cfg.text_dim, generator=g)
    t = torch.rand(2, generator=g) * 1000
    grads = []
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def counting(*args, **kwargs):
        entered.append(1)
        return real(*args, **kwargs)

    for blocks in (0, 1):
        torch.manual_seed(0)
        model = parallelize.apply_activation_offload(WanDiT(cfg), blocks)
        with torch.no_grad():
            model.head.linear.weight.normal_(0, 0.02)
        with mock.patch.object(parallelize.torch.autograd.graph, "save_on_cpu", counting):
            model(x, t, text).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(entered) == 1  # block 0 of the second model only
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_the_ema_is_counted_sharded_like_the_main_weights(capsys):
    """14B at TP2 on 64 GPUs: a full fp32 EMA per GPU would be ~28 GB; sharded over DP32 it is 1/32 of that,
    a quarter of the optimizer's three fp32 tensors, and the planner shows it with --ema."""
    import sys

    from megawan.config import ParallelConfig
    from megawan.training.memory import estimate_memory

    cfg = dit_preset("wan2.1-t2v-14b")
    parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=True, recompute="full")
    without = estimate_memory(cfg, parallel, 64, 75_600)
    sharded = estimate_memory(cfg, parallel, 64, 75_600, ema=True)
    whole = estimate_memory(cfg, parallel, 64, 75_600, ema=True, distributed_optimizer=False)
    assert without.ema == 0 and sharded.ema == sharded.params_per_gpu * 4 // 32
    assert sharded.total - without.total == sharded.ema == sharded.optimizer // 3
    assert 26 * 2**30 < whole.ema < 28 * 2**30 and whole.ema // 32 == sharded.ema

    sys.path.insert(0, "tools")
    from plan_parallel import main

    main(["--preset", "wan2.1-t2v-14b", "--gpus", "64", "--top", "1", "--ema"])
    header, row = capsys.readouterr().out.splitlines()[1:3]
    assert header.split()[-5:-3] == ["ema", "activ"]  # ... ema activ total GB TFLOP/...
    assert float(row.split()[-4]) > 0
