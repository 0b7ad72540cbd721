"""The README as a new user reads it: short, every path and link it names exists, every command in its ```bash
blocks names a real program and real options, and the cheap ones run and exit 0. The docs' links resolve too.

Commands run in this process (`megawan.cli.main(argv)`, tools by `runpy`), not as subprocesses: the imports
(torch, megatron-core) are paid once instead of once per command, which keeps this file within a few seconds.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 200

# What the test runs: commands that only print (help, versions, presets, FLOP counts, layouts, a resolved config).
# Everything else (installs, downloads, training, sampling) is checked without running: its program and files
# exist and `--help` of its program lists every option it uses.
CHEAP_MEGAWAN = {"--help", "--version", "env", "presets", "flops"}
CHEAP_SCRIPTS = {"tools/plan_parallel.py"}
CHEAP_FLAGS = {"--help", "--print-config"}
MIN_CHEAP_RUN = 6  # the README's everyday commands hold at least this many; fewer means the parsing broke
EXTERNAL = {"pip", "huggingface-cli", "modelscope"}  # other people's programs: nothing of ours to check
REPO_PATH = re.compile(r"^(?:docs|examples|tools|megawan|kernels|tests|\.ci)/[\w./{},*-]*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _without_code(text: str) -> str:
    """Markdown text with fenced blocks and inline code removed (a Python `x[i](y)` is not a link)."""
    return re.sub(r"`[^`\n]*`", "", _without_code_blocks(text))


def bash_commands(text: str) -> list[list[str]]:
    """The commands of every ```bash block, continuation lines joined, comments dropped, as shell words."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def program(words: list[str]) -> tuple[str, str | None, list[str]]:
    """(kind, target, arguments): ("megawan", None, args), ("script", "tools/x.py", args) or (words[0], ...).
    `python -m megawan[.cli]` is megawan; a launcher (torchrun, srun) is skipped up to the program it starts."""
    if words[0] in ("torchrun", "srun"):
        i = 1
        while i < len(words) and words[i] != "-m" and not words[i].endswith(".py"):
            i += 1
        words = ["python"] + words[i:]
    if words[0] == "megawan":
        return "megawan", None, words[1:]
    if words[0] in ("python", "python3"):
        if words[1] == "-m" and words[2] in ("megawan", "megawan.cli"):
            return "megawan", None, words[3:]
        if words[1].endswith(".py"):
            return "script", words[1], words[2:]
    return words[0], words[1] if len(words) > 1 else None, words[1:]


def run_in_process(kind: str, target: str | None, args: list[str]) -> tuple[int, str]:
    """Exit status and output (stdout + stderr) of `megawan ARGS` or `python TARGET ARGS`, run in this process."""
    out = io.StringIO()
    argv, path = sys.argv, list(sys.path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                if kind == "megawan":
                    from megawan.cli import main

                    code = main(args)
                else:
                    sys.argv = [target] + args
                    runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
                    code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
    return code or 0, out.getvalue()


def options(args: list[str]) -> list[str]:
    """The long options a command uses (`[--encoders` and `--x=1` count as --encoders and --x)."""
    return [a.lstrip("[").split("=")[0].rstrip("]") for a in args if a.lstrip("[").startswith("--")]


def is_cheap(kind: str, target: str | None, args: list[str]) -> bool:
    if kind == "megawan":
        return bool(args) and args[0] in CHEAP_MEGAWAN or bool(CHEAP_FLAGS & set(args))
    return kind == "script" and (target in CHEAP_SCRIPTS or bool(CHEAP_FLAGS & set(args)))


def setup_extras() -> set[str]:
    """The keys of setup.py's EXTRAS dict."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXTRAS":
            return {k.value for k in node.value.keys}
    raise AssertionError("setup.py has no EXTRAS dict")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = _without_code_blocks(open(path, encoding="utf-8").read())
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?)\s*$", text, flags=re.M):
        s = slug(heading)
        seen[s] = seen.get(s, -1) + 1
        if seen[s]:
            seen[f"{s}-{seen[s]}"] = 0
    return set(seen)


def broken_links(path: str) -> list[str]:
    """Each relative link of a Markdown file whose file (or heading anchor) does not exist."""
    broken = []
    for target in LINK.findall(_without_code(open(path, encoding="utf-8").read())):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            broken.append(f"{os.path.relpath(path, ROOT)}: {target}: no such file")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{os.path.relpath(path, ROOT)}: {target}: no heading with that anchor")
    return broken


@pytest.fixture(scope="module")
def readme() -> str:
    return open(README, encoding="utf-8").read()


def test_readme_is_short(readme):
    lines = readme.count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (<= {MAX_README_LINES})"


def test_every_path_and_link_in_the_readme_exists(readme):
    named = set(re.findall(r"`([^`\s]+)`", _without_code_blocks(readme)))
    named |= {w for words in bash_commands(readme) for w in words}
    missing = sorted(p for p in named if REPO_PATH.match(p) and not os.path.exists(os.path.join(ROOT, p)))
    missing += broken_links(README)
    assert not missing, "the README names what does not exist:\n" + "\n".join(missing)


def test_every_docs_link_resolves():
    broken = [b for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) for b in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_the_extras_the_readme_names_are_in_setup_py(readme):
    named = set(re.findall(r"\.\[(\w+)\]", readme))
    assert {"logging", "gpu"} <= named, named  # the parsing still sees the README's install section
    assert named <= setup_extras(), f"README names extras setup.py lacks: {sorted(named - setup_extras())}"


def test_the_cheap_readme_commands_run(readme, monkeypatch):
    monkeypatch.chdir(ROOT)
    ran, failed = [], []
    for words in bash_commands(readme):
        kind, target, args = program(words)
        if not is_cheap(kind, target, args):
            continue
        code, output = run_in_process(kind, target, args)
        ran.append(shlex.join(words))
        if code != 0:
            failed.append(f"{shlex.join(words)}: exit {code}\n{output[-2000:]}")
    assert not failed, "\n\n".join(failed)
    assert len(ran) >= MIN_CHEAP_RUN, f"only {len(ran)} cheap commands found in the README: {ran}"


def test_the_other_readme_commands_name_real_programs_and_options(readme, monkeypatch):
    monkeypatch.chdir(ROOT)
    problems, checked = [], 0
    for words in bash_commands(readme):
        kind, target, args = program(words)
        line = shlex.join(words)
        if is_cheap(kind, target, args) or kind in EXTERNAL:
            continue
        checked += 1
        if kind in ("megawan", "script"):
            if kind == "script" and not os.path.isfile(os.path.join(ROOT, target)):
                problems.append(f"{line}: {target} is not a file")
                continue
            sub = [args[0]] if kind == "megawan" and args and not args[0].startswith("-") else []
            code, usage = run_in_process(kind, target, sub + ["--help"])
            if code != 0:
                problems.append(f"{line}: its --help exits {code}: {usage[-500:]}")
                continue
            problems += [f"{line}: {o} is not in its --help" for o in options(args) if o not in usage]
        elif kind in ("bash", "sbatch"):
            if not os.path.isfile(os.path.join(ROOT, target)):
                problems.append(f"{line}: {target} is not a file")
        elif kind == "docker":
            if not os.path.isfile(os.path.join(ROOT, "Dockerfile")):
                problems.append(f"{line}: no Dockerfile at the repository root")
        else:
            problems.append(f"{line}: unknown program {kind!r} (add it to this test's rules)")
    assert not problems, "\n".join(problems)
    assert checked >= 5, checked
