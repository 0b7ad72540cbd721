"""Bad files given to the tools are one line naming the file, status 2: a malformed manifest row, a pickle whose
payload would run code (refused, and the code never runs), a damaged safetensors file, --noise that is not
tensors, a folder where a video or an image is expected. In process: test_user_errors runs one tool for real."""

import importlib.util
import json
import os

import pytest
import torch

from megawan.convert.files import WeightFileError, load_torch_file
from megawan.data.decoding import DecodeError, open_video
from megawan.data.video import decode_image

pytestmark = pytest.mark.reliability  # the reliability suite: docs/reliability.md

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Payload:
    """Unpickled without weights_only, this creates the file `target`: what a hostile checkpoint could do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


def _plant_pickle(path, target):
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(target))}, str(path))
    return str(path)


def _manifest(tmp_path, row):
    path = tmp_path / "clips.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return str(path)


def _precompute_args(manifest, tmp_path, vae):
    # the tool checks that every named file is there; the VAE is loaded first, the others are never opened
    unread = tmp_path / "never_opened"
    unread.touch()
    if not os.path.exists(vae):
        open(vae, "w").close()  # the manifest is read before any weights
    return ["--manifest", manifest, "--out", str(tmp_path / "s.zarr"), "--vae", vae, "--vae-config", "tiny-2.1",
            "--text-encoder", str(unread), "--text-config", "tiny", "--tokenizer", str(unread),
            "--stage-buckets", "1x32x32", "--decode-backend", "pyav", "--no-progress"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MEGAWAN_DEBUG", raising=False)


def test_a_malformed_manifest_row_is_one_line(tmp_path, capsys):
    manifest = _manifest(tmp_path, {"path": "a.mp4", "caption": "a cat", "start": "soon"})
    assert _tool("precompute_latents").main(_precompute_args(manifest, tmp_path, str(tmp_path / "vae.pth"))) == 2
    err = capsys.readouterr().err
    assert err == f"precompute_latents.py: {manifest}: row 1, field 'start': 'soon' is not a number\n"
    assert not os.path.exists(tmp_path / "s.zarr")


def test_a_pickle_with_code_is_refused_in_one_line_and_never_runs(tmp_path, capsys):
    target = tmp_path / "pwned"
    vae = _plant_pickle(tmp_path / "Wan2.1_VAE.pth", target)
    manifest = _manifest(tmp_path, {"path": "a.mp4", "caption": "a cat"})
    assert _tool("precompute_latents").main(_precompute_args(manifest, tmp_path, vae)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"precompute_latents.py: {vae} holds code or Python objects"), err
    assert "not loaded for safety" in err and not target.exists()


def test_noise_that_is_not_tensors_is_named(tmp_path):
    target = tmp_path / "pwned"
    noise = _plant_pickle(tmp_path / "noise.pt", target)
    with pytest.raises(WeightFileError, match=f"^{noise} holds code or Python objects"):
        load_torch_file(noise)  # what `megawan generate --noise` reads with
    assert not target.exists()
    truncated = tmp_path / "cut.pt"
    torch.save(torch.zeros(64), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(WeightFileError, match=f"^{truncated} is not a readable torch file"):
        load_torch_file(str(truncated))


def test_a_damaged_safetensors_file_is_named(tmp_path, capsys):
    src = tmp_path / "Wan2.1-T2V"
    src.mkdir()
    (src / "config.json").write_text("{}")
    shard = src / "diffusion_pytorch_model-00001-of-00002.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    argv = ["--src", str(src), "--src-format", "official", "--dst", str(tmp_path / "out"), "--dst-format", "megawan"]
    assert _tool("convert_checkpoint").main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"convert_checkpoint: {shard} is not a readable safetensors file")


def test_a_folder_given_for_a_video_or_an_image_says_so(tmp_path):
    with pytest.raises(DecodeError, match="is a directory, not a video file"):
        open_video(str(tmp_path))
    with pytest.raises(DecodeError, match="is a directory, not an image file"):
        decode_image(str(tmp_path))
    with pytest.raises(DecodeError, match="file not found"):
        open_video(str(tmp_path / "missing.mp4"))
