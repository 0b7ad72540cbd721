"""tools/bench_dit.py stays alive: its CPU smoke run (tiny preset) measures both implementations."""

import json
import os
import sys

import pytest

pytest.importorskip("diffusers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def test_bench_dit_tiny_reports_step_times_flops_and_ratio(tmp_path):
    import bench_dit

    assert bench_dit.main(["--tiny", "--compare", "diffusers", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 3 * 4 * 4 and result["model_flops_per_step"] > 0
    for impl in ("megawan", "diffusers"):
        r = result["results"][impl]
        assert r["seconds"] > 0 and r["model_tflops"] > 0
    assert result["results"]["megawan"]["ratio_vs_megawan"] == 1.0
    # FP8 without Transformer Engine: the local backend's torch._scaled_mm products
    assert bench_dit.main(["--tiny", "--precision", "fp8", "--compare", "--json", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["results"]["megawan"]["seconds"] > 0
