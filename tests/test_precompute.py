"""Precompute: manifest -> decode -> bucket -> VAE + umT5 -> Zarr, on 2 gloo ranks under torchrun; bad files
reported, never fatal; a job killed at a random point and run again ends with the same store as an
uninterrupted one; stored latents are the VAE's output, bit for bit after the bf16 cast."""

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from parallel_harness import kill_tree
import torch

from megawan import capabilities
from megawan.config import ConfigError
from megawan.data import dali, precompute
from megawan.data.precompute import Encoders, PrecomputeJob, decode_device_id, prepare, run_precompute
from megawan.data.manifest import read_manifest
from megawan.data.store import LatentStore
from megawan.demo.shapes import write_synthetic_dataset
from megawan.demo.tiny_assets import write_tiny_encoders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = ["17x32x32", "17x32x48", "1x32x32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    encoders = write_tiny_encoders(str(root / "encoders"))
    manifest = write_synthetic_dataset(str(root / "videos"), count=200, frames=17, height=32, width=48, broken=10)
    return root, manifest, encoders


def _args(manifest, out, enc):
    return ["--manifest", manifest, "--out", out, "--vae", enc["vae"], "--vae-config", enc["vae_config"],
            "--text-encoder", enc["text_encoder"], "--text-config", enc["text_config"],
            "--tokenizer", enc["tokenizer"], "--stage-buckets", *BUCKETS, "--decode-workers", "2"]


def _torchrun(args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           os.path.join(ROOT, "tools", "precompute_latents.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _contents(path):
    store = LatentStore.open(path)
    out = {}
    for bucket in store.buckets():
        for i in range(store.count(bucket)):
            s = store.read(bucket, i)
            out[s["id"]] = (bucket, s["latents"], s["text"], s["text_length"], s["caption"], tuple(s["frame_indices"]))
    return out


@pytest.mark.reliability
def test_two_ranks_kill_and_resume_give_the_uninterrupted_store(dataset):
    root, manifest, enc = dataset
    clean, killed = str(root / "clean.zarr"), str(root / "killed.zarr")
    proc = _torchrun(_args(manifest, clean, enc), 29611)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert "skipped files: 10" in log, log

    # the same job, SIGKILLed (the whole process group, as a pre-empted node) once a random number is stored
    target = random.Random(os.getpid()).randint(20, 150)
    proc = _torchrun(_args(manifest, killed, enc), 29612)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(LatentStore.open(killed).ids()) >= target:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    partial = len(LatentStore.open(killed).ids())
    assert 0 < partial < 200, f"the kill landed outside the run ({partial} stored)"

    proc = _torchrun(_args(manifest, killed, enc), 29613)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log

    a, b = _contents(clean), _contents(killed)
    good = {e.id for e in read_manifest(manifest) if not e.id.startswith("broken")}
    assert set(a) == good and set(b) == good  # every good clip stored, once
    assert len(LatentStore.open(killed).ids()) == 200
    for sample_id in good:
        x, y = a[sample_id], b[sample_id]
        assert x[0] == y[0] and x[3:] == y[3:]
        assert torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]), sample_id
    with open(killed + ".skipped.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    assert sorted(s["id"] for s in skipped) == [f"broken_{j:03d}" for j in range(10)]
    assert all(s["reason"] for s in skipped)


def test_stored_latents_are_the_vae_output_and_rerun_adds_nothing(dataset, tmp_path):
    root, manifest, enc = dataset
    rows = read_manifest(manifest)[:6]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"id": e.id, "path": e.path, "caption": e.caption}) + "\n" for e in rows))
    job = PrecomputeJob(manifest=str(small), out=str(tmp_path / "s.zarr"), vae=enc["vae"], vae_config="tiny-2.1",
                        text_encoder=enc["text_encoder"], text_config="tiny", tokenizer=enc["tokenizer"],
                        buckets=BUCKETS, save_logvar=True)
    summary = run_precompute(job, progress=False)
    assert summary["written"] == 6 and summary["store"] == {"17x32x48": 6}

    encoders = Encoders(job, torch.device("cpu"))
    store = LatentStore.open(job.out)
    assert store.attrs["vae"]["z_dim"] == 4 and store.attrs["vae"]["stride"] == [4, 8, 8]
    for i in range(6):
        stored = store.read("17x32x48", i)
        entry = next(e for e in rows if e.id == stored["id"])
        item = prepare(entry, job.resolved_buckets(), job.fps)
        mean, logvar = encoders.encode_video(item.video)
        assert stored["latents"].dtype == torch.bfloat16 and torch.equal(stored["latents"], mean)
        assert torch.equal(stored["logvar"], logvar)
        text, length = encoders.encode_text(entry.caption)
        assert torch.equal(stored["text"], text) and stored["text_length"] == length
        assert stored["caption"] == entry.caption and list(stored["frame_indices"]) == list(range(17))

    again = run_precompute(job, progress=False)  # a finished job run again does nothing
    assert again["written"] == 0 and again["already_done"] == 6


def test_a_store_refuses_other_encoders(dataset, tmp_path):
    root, manifest, enc = dataset
    other = write_tiny_encoders(str(tmp_path / "other"), seed=1)
    rows = read_manifest(manifest)[:1]
    small = tmp_path / "one.jsonl"
    small.write_text(json.dumps({"id": rows[0].id, "path": rows[0].path, "caption": rows[0].caption}) + "\n")
    job = PrecomputeJob(manifest=str(small), out=str(tmp_path / "s.zarr"), vae=enc["vae"], vae_config="tiny-2.1",
                        text_encoder=enc["text_encoder"], text_config="tiny", tokenizer=enc["tokenizer"], buckets=BUCKETS)
    run_precompute(job, progress=False)
    job.vae = other["vae"]
    with pytest.raises(ValueError, match="different vae"):
        run_precompute(job, progress=False)


def test_a_backend_this_machine_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """dali-gpu without a CUDA device: one line naming the option and the alternatives, from the job and from the
    tool, before a manifest or an encoder is read (none of these files exist) or a store is made."""
    monkeypatch.setattr(capabilities, "cuda_available", lambda: False)
    missing = str(tmp_path / "missing")
    job = PrecomputeJob(manifest=missing, out=str(tmp_path / "s.zarr"), vae=missing, text_encoder=missing,
                        tokenizer=missing, buckets=BUCKETS, decode_backend="dali-gpu")
    refused = (r"PrecomputeJob.decode_backend \(--decode-backend\): dali-gpu decodes with NVDEC on a CUDA device "
               r"and this machine has none; use dali-cpu \(VP8 / VP9 / MJPEG\) or pyav \(every codec\)")
    with pytest.raises(ConfigError, match=refused):
        run_precompute(job, progress=False)
    assert not os.path.exists(job.out)

    spec = importlib.util.spec_from_file_location("precompute_latents", os.path.join(ROOT, "tools",
                                                                                   "precompute_latents.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    enc = {"vae": missing, "vae_config": "tiny-2.1", "text_encoder": missing, "text_config": "tiny",
           "tokenizer": missing}
    assert tool.main(_args(missing, job.out, enc) + ["--decode-backend", "dali-gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(refused, err), err

    job.decode_backend = "ffmpeg"
    with pytest.raises(ConfigError, match=r"unknown 'ffmpeg'; use one of auto \| pyav \| dali-cpu \| dali-gpu"):
        job.check()
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    job.decode_backend = "dali-cpu"
    with pytest.raises(ConfigError, match=r"dali-cpu needs NVIDIA DALI, which does not import here .*; use pyav"):
        job.check()
    for backend in ("auto", "pyav"):  # what a CPU machine without DALI runs
        job.decode_backend = backend
        job.check()


def test_each_rank_decodes_on_its_own_gpu(monkeypatch):
    """DALI decodes on the encoders' device, which tools/precompute_latents.py takes from parallel.initialize
    (LOCAL_RANK): rank 3's clips on cuda:3, never all on cuda:0."""
    assert decode_device_id(torch.device("cuda", 3)) == 3
    assert decode_device_id(torch.device("cpu")) is None
    monkeypatch.setattr(precompute, "rank_device", lambda: torch.device("cuda", 5))  # set_device(5) in this rank
    assert decode_device_id(torch.device("cuda")) == 5
