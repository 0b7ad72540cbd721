"""Verified checkpoints (megawan.checkpoint_integrity): every file of a training checkpoint (a tiny DiT, megatron's
distributed optimizer, one gloo rank) is recorded with its size and checksum before the folder is renamed; each
kind of damage is then named in one line, a resume falls back past a damaged newest checkpoint to the previous
one (and loads it), or with on_corrupt 'fail' stops naming the file. Conversion's reader refuses a damaged one."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from test_ema import _train_step

from megawan.checkpoint import (
    CheckpointTensors,
    checkpoint_name,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from megawan.checkpoint_integrity import INTEGRITY_DIR, UNVERIFIED, CheckpointError, verify_checkpoint
from megawan.config import ConfigError, ParallelConfig, dit_preset, load_config
from megawan.parallel.launch import spawn_local

pytestmark = pytest.mark.reliability  # the reliability suite: docs/reliability.md


def _write_two_checkpoints(rank, root, out):
    """Steps 1 and 2 of a tiny DiT with its optimizer; then the newest is truncated and a resume (over the
    process group) must fall back to step 1 and load it."""
    from megawan.models.dit.parallelize import build_model_chunks
    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.training import optimizer as optim

    cfg = dit_preset("tiny")
    with megatron_cpu_mode():
        torch.manual_seed(0)
        chunks = build_model_chunks(cfg, ParallelConfig())
        ddp = optim.wrap_data_parallel(chunks, distributed_optimizer=True)
        optimizer = optim.build_optimizer(ddp, lr=1e-2)
        for step in (1, 2):
            assert _train_step(ddp, optimizer, cfg, step, range(1))
            save_checkpoint(root, step, chunks, optimizer, {"step": step}, {"model": dataclasses.asdict(cfg)})
        pristine = os.path.join(out, "pristine")
        shutil.copytree(root, pristine)  # what the damage tests start from

        shard = os.path.join(root, checkpoint_name(2), "__0_0.distcp")
        os.truncate(shard, os.path.getsize(shard) // 2)
        path, notes = resume_checkpoint(root)
        state = load_checkpoint(path, chunks, optimizer)
        with open(os.path.join(out, "resumed.json"), "w") as f:
            json.dump({"path": path, "notes": notes, "state": state}, f)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity")
    spawn_local(_write_two_checkpoints, world_size=1, args=(str(out / "run"), str(out)))
    with open(out / "resumed.json") as f:
        return str(out / "pristine"), json.load(f)


@pytest.fixture
def root(written, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(written[0], copy)
    return copy


def _newest(root):
    return os.path.join(root, checkpoint_name(2))


def test_every_file_of_the_checkpoint_is_recorded_and_intact(root):
    newest = _newest(root)
    recorded = json.load(open(os.path.join(newest, INTEGRITY_DIR, "rank_0.json")))["files"]
    on_disk = sorted(n for n in os.listdir(newest) if n != INTEGRITY_DIR)
    assert sorted(recorded) == on_disk
    assert {".metadata", "common.pt", "metadata.json", "trainer_state.json", "config.yaml",
            "__0_0.distcp"} <= set(on_disk)
    assert verify_checkpoint(newest) is None
    assert resume_checkpoint(root) == (newest, [])


def _truncate(path):
    os.truncate(path, os.path.getsize(path) - 1)


def _flip_bytes(path):
    with open(path, "r+b") as f:  # same size, four bytes in the middle changed
        f.seek(os.path.getsize(path) // 2)
        data = f.read(4)
        f.seek(-4, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


DAMAGE = {  # file, what is done to it, what the verdict says
    "shard truncated": ("__0_0.distcp", _truncate, "__0_0.distcp has"),
    "shard deleted": ("__0_0.distcp", os.remove, "__0_0.distcp is missing"),
    "shard bytes changed": ("__0_0.distcp", _flip_bytes, "__0_0.distcp has changed"),
    "metadata missing": (".metadata", os.remove, ".metadata is missing"),
    "common file missing": ("common.pt", os.remove, "common.pt is missing"),
    "state file missing": ("trainer_state.json", os.remove, "trainer_state.json is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_each_damage_is_named_and_a_resume_falls_back_or_fails(root, case):
    name, damage, verdict = DAMAGE[case]
    newest = _newest(root)
    damage(os.path.join(newest, name))
    assert verify_checkpoint(newest).startswith(verdict)

    path, notes = resume_checkpoint(root)  # default: fallback to the previous, with one warning line
    assert path == os.path.join(root, checkpoint_name(1))
    assert len(notes) == 1 and "\n" not in notes[0] and notes[0].startswith("warning:") and verdict in notes[0]

    with pytest.raises(CheckpointError) as e:
        resume_checkpoint(root, on_corrupt="fail")
    assert verdict in str(e.value) and newest in str(e.value) and "\n" not in str(e.value)


def test_a_resume_over_the_process_group_loads_the_previous_checkpoint(written):
    resumed = written[1]
    assert resumed["path"].endswith(checkpoint_name(1)) and resumed["state"] == {"step": 1}
    assert "__0_0.distcp has" in resumed["notes"][0]


def test_a_missing_manifest_of_a_rank_is_damage_and_none_at_all_is_unverified(root):
    newest = _newest(root)
    manifest = json.load(open(os.path.join(newest, INTEGRITY_DIR, "rank_0.json")))
    with open(os.path.join(newest, INTEGRITY_DIR, "rank_0.json"), "w") as f:
        json.dump({**manifest, "world": 2}, f)  # as if a second rank had written one
    assert verify_checkpoint(newest) == f"{INTEGRITY_DIR}/rank_1.json is missing"

    shutil.rmtree(os.path.join(newest, INTEGRITY_DIR))  # written before checksums existed: still loads
    assert verify_checkpoint(newest) == UNVERIFIED
    path, notes = resume_checkpoint(root)
    assert path == newest and "unverified" in notes[0]


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(root):
    for step in (1, 2):
        os.remove(os.path.join(root, checkpoint_name(step), "common.pt"))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resume_checkpoint(root)


def test_conversion_refuses_a_damaged_checkpoint(root):
    assert CheckpointTensors(_newest(root)).keys()
    _flip_bytes(os.path.join(_newest(root), "__0_0.distcp"))
    with pytest.raises(CheckpointError, match="__0_0.distcp has changed"):
        CheckpointTensors(_newest(root))


def test_on_corrupt_is_validated():
    with pytest.raises(ConfigError, match="checkpoint.on_corrupt"):
        load_config(None, ["model.preset=tiny", "checkpoint.on_corrupt=ignore"])


def test_megawan_train_resumes_past_a_damaged_newest_checkpoint_or_stops_naming_it(tiny_store, tmp_path):
    """The trainer (one rank under torchrun): checkpoints at steps 2 and 4, bytes of step 4's shard changed; the
    next run warns naming the file, resumes from step 2 and rewrites step 4. With on_corrupt 'fail' a damaged
    newest checkpoint stops the run with one line naming the file."""
    from training_runs import run as _run

    store = tiny_store  # the trainer tests' store, made once per session
    ckpt = str(tmp_path / "ckpt")
    one_rank = ("parallel.tensor_parallel=1",)
    code, log = _run(1, ckpt, store, *one_rank, "train.steps=4")
    assert code == 0, log
    _flip_bytes(os.path.join(ckpt, checkpoint_name(4), "__0_0.distcp"))

    code, log = _run(1, ckpt, store, *one_rank, "train.steps=6")
    assert code == 0, log
    assert f"warning: checkpoint {os.path.join(ckpt, checkpoint_name(4))} is damaged (__0_0.distcp has changed" in log
    assert f"resumed from {os.path.join(ckpt, checkpoint_name(2))} at step 2" in log
    assert verify_checkpoint(os.path.join(ckpt, checkpoint_name(4))) is None  # written again at step 4

    os.remove(os.path.join(ckpt, checkpoint_name(6), "common.pt"))
    code, log = _run(1, ckpt, store, *one_rank, "train.steps=8", "checkpoint.on_corrupt=fail")
    assert code != 0
    line = f"megawan train: checkpoint {os.path.join(ckpt, checkpoint_name(6))} is damaged: common.pt is missing"
    assert line in log, log
