"""tools/gpu_e2e.py, the GPU end-to-end script, kept working between GPU leases: at its tiny size on CPU every
phase that needs no GPU passes (clips, precompute, training SIGKILLed mid-run and resumed, generate, diffusers'
WanPipeline on the converted checkpoint), the GPU-only ones are skipped with their reason; a failed check
makes the run fail and skips the phases that need it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

pytest.importorskip("diffusers")


def test_tiny_cpu_run_passes_every_phase_that_needs_no_gpu(tmp_path):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "gpu_e2e.py"), "--device", "cpu", "--tiny", "--work",
           str(tmp_path / "work"), "--json", str(out), "--budget", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert {name: p["status"] for name, p in phases.items()} == {
        "clips": "ok", "precompute": "ok", "train": "ok", "fp8": "skipped", "generate": "ok", "diffusers": "ok",
        "kernel_tests": "skipped"}
    assert report["ok"] is True and report["device"] == "cpu"
    assert all(p["seconds"] > 0 for p in phases.values() if p["status"] == "ok")
    train = phases["train"]
    # killed after its checkpoint, resumed there, the steps it had logged past it re-run to the same losses
    assert 0 < train["resumed_from_step"] < train["killed_after_step"] < train["final_step"] == 6
    assert train["relogged_steps"] and train["relogged_max_rel_diff"] == 0.0
    assert len(train["losses"]) == 6 and len(train["val_videos"]) == 2
    assert phases["generate"]["change_from_noise"] > 0.05
    assert phases["diffusers"]["rel_error_fp32"] < 1e-4
    assert (tmp_path / "work" / "generated.mp4").is_file()


def test_a_failed_phase_fails_the_run_keeps_what_it_measured_and_skips_what_needs_it(tmp_path):
    from e2e_support import E2EError, Report, check

    report = Report(str(tmp_path / "r.json"), {"device": "cpu"})

    def data(out):
        out["clips"] = 3

    def broken(out):
        out["first_loss"] = 1.25
        check(False, "latents are not finite")

    report.phase("data", data)
    report.phase("train", broken, needs=("data",))
    report.phase("generate", lambda out: None, needs=("train",))
    assert report.finish() is False
    written = json.loads((tmp_path / "r.json").read_text())["phases"]
    assert written["data"]["status"] == "ok" and written["data"]["clips"] == 3
    assert written["train"]["status"] == "failed" and written["train"]["first_loss"] == 1.25
    assert written["train"]["error"] == "E2EError: latents are not finite"
    assert written["generate"] == {"status": "skipped", "reason": "needs phase train, which did not pass"}
    with pytest.raises(E2EError, match="x"):
        check(False, "x")
