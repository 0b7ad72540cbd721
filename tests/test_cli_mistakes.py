"""First-contact mistakes on the command line: each is one line `prog: message` on stderr naming what to fix, exit
status 2, no traceback (megawan.utils.user_errors). In process, through the same main() the console script
runs. Also: every flag of every subcommand says what it does in --help, and --help shows the defaults."""

import argparse
import importlib.util
import json
import os

import pytest

from megawan.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MEGAWAN_DEBUG", raising=False)


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line(capsys, prog):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: ") and "Traceback" not in err, err
    return err


def test_train_with_a_missing_config_file(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert main(["train", "--config", missing]) == 2
    assert _one_line(capsys, "megawan train") == f"megawan train: {missing}: No such file or directory\n"


def test_flops_with_a_misspelt_preset(capsys):
    assert main(["flops", "wan21", "--frames", "81", "--height", "480", "--width", "832"]) == 2
    err = _one_line(capsys, "megawan flops")
    assert "'wan21'" in err and "wan2.1-t2v-1.3b" in err  # the known presets are listed


def test_flops_without_frames_is_argparse_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["flops", "wan2.1-t2v-1.3b", "--height", "480", "--width", "832"])
    assert stop.value.code == 2
    assert "the following arguments are required: --frames" in capsys.readouterr().err


@pytest.mark.parametrize("size,flag", [(("80", "480", "832"), "--frames"), (("81", "480", "840"), "--width")])
def test_flops_refuses_a_video_size_the_vae_cannot_take(capsys, size, flag):
    frames, height, width = size
    assert main(["flops", "wan2.2-ti2v-5b", "--frames", frames, "--height", height, "--width", width]) == 2
    assert _one_line(capsys, "megawan flops").startswith(f"megawan flops: {flag}: ")


def test_flops_takes_video_sizes_and_latent_sizes_alike(capsys):
    assert main(["flops", "wan2.1-t2v-1.3b", "--frames", "81", "--height", "480", "--width", "832"]) == 0
    video = capsys.readouterr().out
    assert main(["flops", "wan2.1-t2v-1.3b", "--latent", "--frames", "21", "--height", "60", "--width", "104"]) == 0
    latent = capsys.readouterr().out
    assert "latent 21x60x104, 32,760 tokens" in video and "32,760 tokens" in latent
    assert video.split("; ")[1] == latent.split("; ")[1]  # the same FLOPs


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "my_data.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is not empty" in _one_line(capsys, "megawan demo")
    assert os.listdir(tmp_path) == ["my_data.txt"]  # nothing written


def test_plot_metrics_with_a_missing_file(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert _tool("plot_metrics").main([missing, "--out", str(tmp_path / "loss.png")]) == 2
    assert missing in _one_line(capsys, "plot_metrics.py")


def test_precompute_with_a_missing_manifest_or_tokenizer(tmp_path, capsys):
    vae = tmp_path / "vae.pth"
    vae.touch()
    manifest = tmp_path / "clips.jsonl"
    args = ["--out", str(tmp_path / "s.zarr"), "--vae", str(vae), "--text-encoder", str(vae), "--tokenizer"]
    tool = _tool("precompute_latents")
    assert tool.main(["--manifest", str(manifest), *args, str(vae)]) == 2
    assert _one_line(capsys, "precompute_latents.py") == \
        f"precompute_latents.py: --manifest {manifest}: no such file or folder\n"
    manifest.write_text(json.dumps({"path": "a.mp4", "caption": "a cat"}) + "\n")
    assert tool.main(["--manifest", str(manifest), *args, str(tmp_path / "spiece.model")]) == 2
    assert "--tokenizer" in _one_line(capsys, "precompute_latents.py")  # before any weights load
    assert not os.path.exists(tmp_path / "s.zarr")


def _actions(parser, path="megawan"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_flag_has_help_and_help_shows_defaults(capsys):
    parser = build_parser()
    undocumented = [f"{path} {action.dest}" for path, action in _actions(parser) if not action.help]
    assert not undocumented, undocumented
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: unipc)" in text and "(default: None)" not in text


def test_version_and_print_config(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("megawan 0.")
    config = os.path.join(ROOT, "examples", "configs", "tiny_tp2.yaml")
    assert main(["train", "--config", config, "train.steps=7", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["parallel"]["tensor_parallel"] == 2
