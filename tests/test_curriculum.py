"""Wan's curriculum as configs: every stage of the 1.3B and 14B chains loads, validates at its cluster size
and fits an H100 by the memory estimate at its largest bucket; the tiny copy of the chain trains stage after
stage, each warm-starting from the previous one's newest checkpoint."""

import glob
import os
import subprocess
import sys

import pytest

from megawan.config import load_config
from megawan.training.memory import estimate_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = {"wan2.1-t2v-1.3b": 64, "wan2.1-t2v-14b": 256}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples/configs/wan2.1-t2v-*/*.yaml"))))
def test_curriculum_stage_is_valid_and_fits(path):
    model = os.path.basename(os.path.dirname(path))
    cfg = load_config(path)
    world = WORLD[model]
    cfg.validate(world)
    assert cfg.data.global_batch_size % cfg.parallel.data_parallel(world) == 0
    frames, height, width = max((tuple(int(v) for v in b.split("x")) for b in cfg.data.buckets),
                                key=lambda s: ((s[0] - 1) // 4 + 1) * s[1] * s[2])
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    est = estimate_memory(cfg.model, cfg.parallel, world, tokens, cfg.data.micro_batch_size,
                          text_len=cfg.model.text_len, ema=cfg.train.ema_decay > 0)
    assert est.total / 2**30 < cfg.train.memory_budget_gb, (path, tokens, est)
    stage = int(os.path.basename(path)[5])
    assert (cfg.checkpoint.init_from is None) == (stage == 0)


def test_tiny_curriculum_warm_starts_stage_after_stage(tmp_path, slurm_dataset):
    store, _ = slurm_dataset  # tests/conftest.py: make_tiny_dataset(videos=8, images=8), made once per session
    previous = None
    for i, name in enumerate(["stage0_t2i", "stage1_joint", "stage2_video"]):
        config = os.path.join(ROOT, "examples", "configs", "tiny-curriculum", f"{name}.yaml")
        ckpt = str(tmp_path / "runs" / name)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29850 + i), "-m", "megawan.cli", "train", "--config", config, f"data.store={store}",
               f"checkpoint.dir={ckpt}"] + ([f"--init-from={previous}"] if previous else [])
        out = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        if previous:
            assert f"warm start from {previous}/iter_0000003" in out.stdout
        assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000003"
        previous = ckpt
