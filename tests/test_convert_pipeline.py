"""tools/convert_checkpoint.py (megawan.export): whole pipelines between the official layout, diffusers and megawan's sharded
format. Round trips are bit-exact for every tensor (bf16 kept bf16); wrong keys and shapes are refused."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megawan.checkpoint import CheckpointTensors
from megawan.convert import SafetensorsDir
from megawan.export import convert_pipeline
from pipelines import make_official_pipeline

pytest.importorskip("diffusers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(folder):
    src = SafetensorsDir(folder)
    return {k: src.get(k) for k in src.keys()}


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _pth(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    cfg = make_official_pipeline(folder)
    return folder, cfg


def test_official_to_megawan_tp2_pp2_and_back_is_bit_exact(official, tmp_path):
    src, cfg = official
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 1  # the DiT really is sharded
    mw, back = tmp_path / "megawan", tmp_path / "back"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--src", str(src),
                          "--src-format", "official", "--dst", str(mw), "--dst-format", "megawan", "--tp", "2",
                          "--pp", "2"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TP2 x PP2" in out.stdout
    # written by four ranks: two tensor-parallel shards of each of two pipeline stages
    assert len([f for f in os.listdir(mw / "transformer") if f.endswith(".distcp")]) >= 4
    meta = json.loads((mw / "megawan_pipeline.json").read_text())
    assert meta["transformer"] == {"transformer": "transformer"} and meta["vae_config"] == "tiny-2.1"
    convert_pipeline(str(mw), "megawan", str(back), "official")

    _same(_tensors(src), _tensors(back))
    assert next(iter(_tensors(back).values())).dtype == torch.bfloat16
    _same(_pth(src / "Wan2.1_VAE.pth"), _pth(back / "Wan2.1_VAE.pth"))
    _same(_pth(src / "models_t5_umt5-tiny-enc.pth"), _pth(back / "models_t5_umt5-tiny-enc.pth"))
    assert (src / "umt5-tokenizer" / "spiece.model").read_bytes() == \
        (back / "google" / "umt5-xxl" / "spiece.model").read_bytes()
    assert json.loads((back / "config.json").read_text())["dim"] == cfg.dim


def test_official_to_diffusers_to_megawan_keeps_every_tensor(official, tmp_path):
    from megawan.convert import convert_state_dict

    src, cfg = official
    diff, mw = tmp_path / "diffusers", tmp_path / "megawan"
    convert_pipeline(str(src), "official", str(diff), "diffusers")
    assert json.loads((diff / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    convert_pipeline(str(diff), "diffusers", str(mw), "megawan", tp=2)
    expected = convert_state_dict(_tensors(src), "official", "megawan", cfg)
    got = CheckpointTensors(str(mw / "transformer"))
    assert sorted(got.keys()) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got.get(k), v) and got.get(k).dtype == v.dtype, k
    # the encoders came through diffusers' and transformers' names unchanged
    from safetensors.torch import load_file

    vae = load_file(str(mw / "vae.safetensors"))
    official_vae = convert_state_dict(_pth(src / "Wan2.1_VAE.pth"), "official", "megawan",
                                      __import__("megawan.config", fromlist=["vae_preset"]).vae_preset("tiny-2.1"))
    _same(official_vae, vae)


def test_a14b_experts_round_trip(tmp_path):
    src, mw, back = tmp_path / "official", tmp_path / "megawan", tmp_path / "back"
    cfg = make_official_pipeline(src, preset="tiny-a14b", overrides={})
    assert (src / "high_noise_model").is_dir() and (src / "low_noise_model").is_dir()
    with pytest.raises(ValueError, match="boundary"):  # config.json does not say where the experts switch
        convert_pipeline(str(src), "official", str(tmp_path / "x"), "megawan")
    convert_pipeline(str(src), "official", str(mw), "megawan", model="tiny-a14b", tp=2)
    meta = json.loads((mw / "megawan_pipeline.json").read_text())
    assert meta["model"]["expert_boundary"] == cfg.expert_boundary
    assert sorted(meta["transformer"]) == ["high_noise", "low_noise"]
    convert_pipeline(str(mw), "megawan", str(back), "official")
    for expert in ("high_noise_model", "low_noise_model"):
        _same(_tensors(src / expert), _tensors(back / expert))
    assert not torch.equal(*[next(iter(_tensors(back / e).values())) for e in ("high_noise_model", "low_noise_model")])


def test_mismatched_weights_are_refused_naming_the_key(official, tmp_path):
    src, _ = official
    # the tiny preset takes 16 latent channels; these weights patch-embed 4 (the tiny-2.1 VAE's)
    with pytest.raises(ValueError, match=r"'patch_embedding.weight' has shape \(32, 4, 1, 2, 2\), expected"):
        convert_pipeline(str(src), "official", str(tmp_path / "a"), "official", model="tiny")
    with pytest.raises(ValueError, match="--tp / --pp"):
        convert_pipeline(str(src), "official", str(tmp_path / "b"), "diffusers", tp=2)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_pipeline(str(src), "official", str(tmp_path / "c"), "megawan")


def test_pickled_objects_are_never_loaded(tmp_path):
    from megawan.convert import load_state_dict_file
    from megawan.convert.files import WeightFileError

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(WeightFileError, match="holds code or Python objects other than tensors, which are not loaded"):
        load_state_dict_file(str(path))
