"""tools/bench_dit.py's FP8 implementations side by side: ours (current and delayed scaling on the local backend)
and torchao's Float8Linear, skipped with its reason where torchao is not importable (the CPU smoke run)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def test_which_fp8_context_each_implementation_runs_under():
    from bench_dit import fp8_recipe_of

    assert fp8_recipe_of("megawan-fp8", "bf16", "te") == ("current", "local")  # ours: always the local linears
    assert fp8_recipe_of("megawan-fp8-delayed", "bf16", "local") == ("delayed", "local")
    assert fp8_recipe_of("megawan", "fp8", "te") == ("delayed", "te")  # --precision fp8: as before
    assert fp8_recipe_of("megawan", "fp8", "local") == ("current", "local")
    assert fp8_recipe_of("megawan", "bf16", "local") is None
    assert fp8_recipe_of("megawan-fp8-torchao", "bf16", "local") is None  # torchao's own casts, no context
    assert fp8_recipe_of("diffusers", "fp8", "local") is None


def test_one_run_reports_bf16_and_both_fp8_recipes_and_torchao_or_why_not(tmp_path):
    import bench_dit

    out = tmp_path / "fp8.json"
    assert bench_dit.main(["--tiny", "--compare", "megawan-fp8", "megawan-fp8-delayed", "megawan-fp8-torchao",
                           "--amax-history", "4", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for impl in ("megawan", "megawan-fp8", "megawan-fp8-delayed"):
        assert results[impl]["seconds"] > 0, results[impl]
    torchao = results["megawan-fp8-torchao"]
    if bench_dit.torchao_missing():
        assert "torchao" in torchao["skipped"]
    else:  # torchao's float8 wants a CUDA device with FP8 products: on CPU an error is an answer too
        assert "seconds" in torchao or "error" in torchao
    with pytest.raises(SystemExit):
        bench_dit.parse_args(["--compare", "megawan-fp9"])


def test_the_torchao_implementation_routes_every_linear_through_its_converted_shell(monkeypatch):
    """The plumbing of megawan-fp8-torchao, with torchao's conversion stood in by one that keeps nn.Linear
    (torchao is absent here): the model's output and weight gradients stay the model's own."""
    import types

    import torch

    import bench_dit
    from megawan.config import dit_preset

    converted = []
    fake = types.ModuleType("torchao.float8")
    fake.convert_to_float8_training = lambda module: converted.append(len(module))
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", fake)
    cfg = dit_preset("tiny")
    x, t, text, _ = bench_dit.step_inputs(cfg, (1, 4, 4), 1, torch.float32, torch.device("cpu"))
    outs = []
    for route in (False, True):
        torch.manual_seed(0)
        model = bench_dit._megawan_model(cfg, torch.float32, torch.device("cpu"), "local")
        if route:
            assert bench_dit.torchao_fp8(model, compile=False) == converted[0] > 0
        model(x, t, text).square().sum().backward()
        outs.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*outs))
