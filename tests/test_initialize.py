"""initialize(): launcher environments, and layouts that cannot work fail before any rank starts."""

import pytest

from megawan.config import ConfigError, ParallelConfig, RunConfig, dit_preset
from megawan.parallel.initialize import _launcher_environment, first_slurm_host


@pytest.mark.parametrize("nodelist,host", [
    ("gpu012", "gpu012"),
    ("gpu[012-015,020]", "gpu012"),
    ("node[7,9],login1", "node7"),
    ("a-b-c[1-2]", "a-b-c1"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_srun_environment_becomes_torchrun_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # set, then delete: monkeypatch then removes what _launcher_environment writes into os.environ
        # (a bare delenv of an absent variable records nothing, and RANK=5 leaked into later tests' jobs)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[100-103]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    env = _launcher_environment()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "16", "1", "gpu100")
    assert env["MASTER_PORT"] == str(20000 + 4242 % 20000)


@pytest.mark.parametrize("parallel,world,message", [
    (dict(tensor_parallel=2, pipeline_parallel=2), 6, "world size 6 is not divisible by tensor x pipeline x context"),
    (dict(context_parallel=4, context_parallel_mode="2d"), 4, "2d context parallelism needs 1 < ulysses_size"),
    (dict(virtual_pipeline=2), 1, "interleaving needs pipeline_parallel > 1"),
    (dict(sequence_parallel=True), 1, "it needs tensor_parallel > 1"),
    (dict(recompute="some"), 1, "parallel.recompute"),
])
def test_impossible_layouts(parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**parallel).validate(world)


def test_layouts_checked_against_the_model():
    cfg = dit_preset("wan2.1-t2v-14b")  # 40 heads, 40 layers
    RunConfig(model=cfg, parallel=ParallelConfig(tensor_parallel=8, context_parallel=4, context_parallel_mode="ring")).validate(64)
    with pytest.raises(ConfigError, match="heads do not split over tensor_parallel x ulysses"):
        RunConfig(model=cfg, parallel=ParallelConfig(tensor_parallel=8, context_parallel=4)).validate(64)
    with pytest.raises(ConfigError, match="blocks do not split into pipeline_parallel x virtual_pipeline"):
        RunConfig(model=cfg, parallel=ParallelConfig(pipeline_parallel=4, virtual_pipeline=3)).validate(64)
