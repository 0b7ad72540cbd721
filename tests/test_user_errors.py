"""User errors are one line and exit status 2; bugs keep their traceback (megawan.utils.user_errors): the helper
itself, then the `megawan` command given a missing config, a bad override and an unknown preset, and once for
real in a subprocess (status 2, no traceback)."""

import os
import subprocess
import sys

import pytest

from megawan.cli import main
from megawan.config import ConfigError
from megawan.utils.user_errors import UserError, run_main

pytestmark = pytest.mark.reliability  # the reliability suite: docs/reliability.md

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fails(error):
    def fn(x):
        raise error(f"bad thing in {x}\nsecond line")
    return fn


def test_a_user_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("MEGAWAN_DEBUG", raising=False)
    assert run_main("tool", _fails(ConfigError), "model.dim") == 2
    assert capsys.readouterr().err == "tool: bad thing in model.dim second line\n"
    assert run_main("tool", lambda: 0) == 0
    assert run_main("tool", open, "/no/such/file.yaml") == 2  # an OS error about a path: its file and reason
    assert capsys.readouterr().err == "tool: /no/such/file.yaml: No such file or directory\n"


def test_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(AttributeError):
        run_main("tool", _fails(AttributeError), "x")
    with pytest.raises(ValueError):  # a plain ValueError is a user error only where the entry point says so
        run_main("tool", _fails(ValueError), "x")
    assert run_main("tool", _fails(ValueError), "x", also=(ValueError,)) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_megawan_debug_shows_the_traceback_and_still_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("MEGAWAN_DEBUG", "1")
    assert run_main("tool", _fails(UserError), "x") == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in fn" in err and err.endswith("tool: bad thing in x second line\n")


def test_only_rank_0_prints_but_every_rank_exits_2(capsys, monkeypatch):
    # the rank from the launcher's environment: hide a process group that an in-process test before this one
    # (megawan generate, a one-rank group) may have left initialised, whose rank 0 would win
    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    monkeypatch.setenv("RANK", "3")
    assert run_main("tool", _fails(UserError), "x") == 2
    assert capsys.readouterr().err == ""


CLI_CASES = {  # argv -> the one line
    "missing config": (["train", "--config", "/no/run.yaml"], "megawan train: /no/run.yaml: No such file or directory"),
    "config is a folder": (["train", "--config", "{tmp}"], "megawan train: {tmp}: Is a directory"),
    "bad override value": (["train", "--config", "{cfg}", "train.steps=abc"],
                           "megawan train: train.steps: expected an integer, got 'abc'"),
    "override syntax": (["train", "--config", "{cfg}", "steps"],
                        "megawan train: override 'steps' is not of the form section.key=value"),
    "unknown preset": (["flops", "wan9", "--frames", "1", "--height", "2", "--width", "2"],
                       "megawan flops: unknown DiT preset 'wan9'; known: tiny, "),
    "no prompt": (["generate", "--ckpt", "x"], "megawan generate: give --prompt TEXT or --prompts FILE"),
    "missing prompts file": (["generate", "--ckpt", "x", "--prompts", "/no/p.txt"],
                             "megawan generate: /no/p.txt: No such file or directory"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_megawan_prints_one_line_for_a_bad_input(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEGAWAN_DEBUG", raising=False)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  preset: tiny\n")
    argv, line = CLI_CASES[case]
    fill = {"tmp": str(tmp_path), "cfg": str(cfg)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line.format(**fill)), err


def test_for_real_status_2_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "MEGAWAN_DEBUG": ""}
    cmd = [sys.executable, "-m", "megawan", "flops", "wan9", "--frames", "21", "--height", "60", "--width", "104"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("megawan flops: unknown DiT preset 'wan9'; known:")
