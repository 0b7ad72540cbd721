"""A damaged checkpoint given to `megawan generate --ckpt`, --init-from or conversion is one line naming the file,
status 2 (not an EOFError naming nothing, or "'str' object has no attribute 'iterdir'" from inside megatron when
common.pt is missing); load_weights checks the checksums; a damaged checkpoint does not count toward `keep`."""

import dataclasses
import importlib.util
import json
import os
import shutil

import pytest
import torch

from megawan.checkpoint import _prunable, resolve_checkpoint
from megawan.checkpoint_integrity import CheckpointError, write_manifests
from megawan.cli import main
from megawan.config import ParallelConfig, dit_preset
from megawan.parallel.launch import spawn_local

pytestmark = pytest.mark.reliability  # the reliability suite: docs/reliability.md

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "__0_0.distcp"


def _flip_bytes(path):
    with open(path, "r+b") as f:  # same size: only the checksum can tell
        f.seek(os.path.getsize(path) // 2)
        data = f.read(4)
        f.seek(-4, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def _write_and_load_changed(rank, out):
    """A tiny DiT's weights-only checkpoint; then load_weights from a copy whose shard bytes changed."""
    from megawan.checkpoint import load_weights, save_model_checkpoint
    from megawan.models.dit.parallelize import build_model_chunks
    from megawan.parallel.cpu_compat import megatron_cpu_mode

    cfg = dit_preset("tiny")
    with megatron_cpu_mode():
        chunks = build_model_chunks(cfg, ParallelConfig())
        path = save_model_checkpoint(os.path.join(out, "ckpt"), chunks, {"model": dataclasses.asdict(cfg)},
                                     {"step": 0})
        changed = os.path.join(out, "changed")
        shutil.copytree(path, changed)
        _flip_bytes(os.path.join(changed, SHARD))
        try:
            load_weights(changed, chunks)
            error = None
        except CheckpointError as e:
            error = str(e)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"path": path, "changed": changed, "error": error}, f)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    spawn_local(_write_and_load_changed, world_size=1, args=(str(out),))
    with open(out / "result.json") as f:
        return json.load(f)


@pytest.fixture
def ckpt(written, tmp_path):
    copy = str(tmp_path / "iter_0000001")
    shutil.copytree(written["path"], copy)
    return copy


def test_load_weights_names_a_shard_whose_bytes_changed(written):
    assert written["error"] == (f"checkpoint {written['changed']} is damaged: {SHARD} has changed since it was "
                                f"written (checksum mismatch)")


@pytest.mark.parametrize("name", ["common.pt", "metadata.json", ".metadata", SHARD])
def test_generate_names_the_missing_file(ckpt, name, capsys, monkeypatch):
    monkeypatch.delenv("MEGAWAN_DEBUG", raising=False)
    os.remove(os.path.join(ckpt, name))
    assert main(["generate", "--ckpt", ckpt, "--prompt", "a cat", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"megawan generate: checkpoint {ckpt} is damaged: {name} is missing\n"


def test_a_checkpoint_written_before_manifests_still_needs_megatrons_files(ckpt):
    shutil.rmtree(os.path.join(ckpt, "integrity"))  # 'unverified': loads, but not without common.pt
    assert resolve_checkpoint(ckpt) == ckpt
    os.remove(os.path.join(ckpt, "common.pt"))
    with pytest.raises(CheckpointError, match="common.pt is missing"):
        resolve_checkpoint(ckpt)


def test_conversion_and_a_run_root_name_a_truncated_shard(ckpt, tmp_path, capsys):
    os.truncate(os.path.join(ckpt, SHARD), 10)
    with open(os.path.join(str(tmp_path), "latest"), "w") as f:  # the run root's pointer: resolved, then checked
        f.write("iter_0000001\n")
    with pytest.raises(CheckpointError, match=f"{SHARD} has 10 bytes"):
        resolve_checkpoint(str(tmp_path))
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--src", ckpt, "--src-format", "megawan", "--dst", str(tmp_path / "out"), "--dst-format", "official"]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"convert_checkpoint: checkpoint {ckpt} is damaged: {SHARD} has 10")


def _fake_checkpoint(root, step, damaged=False):
    """A folder with the trainer state, one shard and its manifest (what _prunable looks at)."""
    folder = os.path.join(root, f"iter_{step:07d}")
    os.makedirs(folder)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"step": step}, f)
    torch.save(torch.zeros(8), os.path.join(folder, SHARD))
    write_manifests(folder)
    if damaged:
        os.truncate(os.path.join(folder, SHARD), 1)


def test_a_damaged_checkpoint_does_not_count_toward_keep(tmp_path):
    root = str(tmp_path)
    for step, damaged in [(1, False), (2, False), (3, False), (4, True), (5, False)]:
        _fake_checkpoint(root, step, damaged)
    # keep=2: the newest two intact ones are 5 and 3; the damaged 4 stays between them, 1 and 2 go
    assert _prunable(root, keep=2) == ["iter_0000001", "iter_0000002"]
    assert _prunable(root, keep=3) == ["iter_0000001"]
    assert _prunable(root, keep=5) == []  # fewer intact ones than keep: nothing goes
