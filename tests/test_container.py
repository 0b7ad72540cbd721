"""The container and the Slurm scripts around it, without Docker or pyxis (neither is on CI's machine): the
Dockerfile builds on NVIDIA's PyTorch image and never reinstalls torch; with CONTAINER_IMAGE the Slurm scripts
hand srun pyxis' container options (their srun replaced by a recorder), without it they pass none; and every
example config the scripts and docs name exists. tests/test_slurm.py runs the scripts on a real Slurm."""

import glob
import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _instructions(path):
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "".join(line for line in open(path) if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_the_dockerfile_builds_megawan_on_nvidias_pytorch_image_and_keeps_its_torch():
    steps = _instructions(os.path.join(ROOT, "Dockerfile"))
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    base = next(a for kind, a in steps if kind == "FROM").strip()
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert steps.index(next(s for s in steps if s[0] == "FROM")) > 0  # the ARG before FROM names the base
    runs = [a for kind, a in steps if kind == "RUN"]
    installs = [shlex.split(part.split("pip install", 1)[1]) for run in runs for part in run.split("&&")
                if "pip install" in part]
    assert installs, runs
    for words in installs:
        assert "-c" in words, words  # every install keeps the base's packages (torch, Transformer Engine, ...)
        packages = [w for w in words if not w.startswith("-") and w != words[words.index("-c") + 1]]
        assert not [p for p in packages if re.match(r"torch\b|torch[=<>~!]", p)], words  # never torch itself
    megawan = [w for words in installs for w in words if w.startswith(".[") or w == "."]
    assert megawan == [".[logging]"] and any("-e" in words for words in installs)
    assert any(re.search(r"nvidia-dali-cuda", w) for words in installs for w in words)
    ignored = open(os.path.join(ROOT, ".dockerignore")).read().split()
    assert ".git" in ignored and "**/__pycache__" in ignored


def _fake_srun(tmp_path):
    """A `srun` that records its arguments (one call a line, fields split by \\x1f) and succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/bash\n{ printf '%s\\x1f' \"$@\"; echo; } >> \"$SRUN_LOG\"\n")
    srun.chmod(0o755)
    return str(bin_dir)


def _run(script, args, tmp_path, submit_dir, **env):
    log = tmp_path / "srun.log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CONTAINER_", "MEGAWAN_"))}
    base.update(PATH=_fake_srun(tmp_path) + os.pathsep + os.environ["PATH"], SRUN_LOG=str(log),
                SLURM_SUBMIT_DIR=submit_dir, MEGAWAN_NO_REQUEUE="1", **env)
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm", script), *args], cwd=submit_dir, env=base,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


def test_slurm_scripts_put_their_tasks_in_the_container_only_when_asked(tmp_path):
    image, mounts = "/images/megawan.sqsh", "/data:/data,/weights:/weights:ro"
    pyxis = [f"--container-image={image}", f"--container-workdir={ROOT}",
             f"--container-mounts={ROOT}:{ROOT},{mounts}"]

    calls = _run("train.sbatch", ["examples/configs/tiny_train.yaml", "train.steps=2"], tmp_path, ROOT,
                 CONTAINER_IMAGE=image, CONTAINER_MOUNTS=mounts)
    train, check = calls  # the training step, then the step check (in the container too)
    assert train[:4] == ["--kill-on-bad-exit=1", *pyxis]
    assert train[4:] == ["python3", "-m", "megawan.cli", "train", "--config", "examples/configs/tiny_train.yaml",
                         "train.steps=2"]
    assert check[:5] == ["--nodes=1", "--ntasks=1", *pyxis] and check[5:7] == ["python3", "-"]

    precompute = ["--manifest", "m.jsonl", "--out", "s.zarr"]
    (call,) = _run("precompute.sbatch", precompute, tmp_path, ROOT, CONTAINER_IMAGE=image)
    assert call[:4] == ["--kill-on-bad-exit=1", f"--container-image={image}", f"--container-workdir={ROOT}",
                        f"--container-mounts={ROOT}:{ROOT}"]
    assert call[4:] == ["python3", os.path.join(ROOT, "tools", "precompute_latents.py"), *precompute]
    elsewhere = str(tmp_path)  # submitted outside a checkout: the image's own tools/
    (call,) = _run("precompute.sbatch", precompute, tmp_path, elsewhere, CONTAINER_IMAGE=image)
    assert call[3] == f"--container-mounts={elsewhere}:{elsewhere}"
    assert call[5] == "/opt/megawan/tools/precompute_latents.py"

    (call,) = _run("precompute.sbatch", precompute, tmp_path, ROOT)  # no image: srun as before
    assert call == ["--kill-on-bad-exit=1", "python3", os.path.join(ROOT, "tools", "precompute_latents.py"),
                    *precompute]


NAMING_FILES = ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))),
                *sorted(glob.glob(os.path.join(ROOT, "examples", "slurm", "*"))),
                *sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))]


@pytest.mark.parametrize("path", NAMING_FILES, ids=lambda p: os.path.relpath(os.path.join(ROOT, p), ROOT))
def test_every_example_config_a_script_or_doc_names_exists(path):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    named = set(re.findall(r"examples/configs/[\w.\-/]+?\.yaml", text))
    missing = sorted(p for p in named if not os.path.isfile(os.path.join(ROOT, p)))
    assert not missing, f"{os.path.relpath(path, ROOT)} names configs that do not exist: {missing}"
