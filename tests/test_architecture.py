"""The shape of the house: imports run one way, no two files import each other, no file grows past 600 lines.

Every import of megawan's own modules (function-level ones too) is read with `ast` from the source of
`megawan/` and `kernels/`; nothing is imported. The layers, lowest first (LAYERS; docs/architecture.md):

    kernels < config, utils < convert < diffusion < parallel < models < lora < checkpoint < artifacts < data
            < curation < training < generation, export, demo, cli, serve

A failure names the file, the line and the import that breaks the rule. `python tests/test_architecture.py`
prints today's report.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("megawan", "kernels")
MAX_LINES = 600

# The layers, lowest first. A module may import its own layer and those below it, never one above.
LAYERS = (
    ("kernels",),
    ("megawan.capabilities", "megawan.utils", "megawan.config"),
    ("megawan.convert",),  # the pure key tables and TP split / merge
    ("megawan.diffusion",),
    ("megawan.parallel",),
    ("megawan.models",),
    ("megawan.lora",),  # adapters on the models' linears, and the LoRA files the community's tools read
    # THE checkpoint format, its checksums, how its tensors are written
    ("megawan.checkpoint", "megawan.checkpoint_integrity", "megawan.checkpoint_strategy"),
    ("megawan.artifacts",),  # what a folder on disk holds
    ("megawan.data",),
    ("megawan.curation",),  # raw clips -> report + curated manifest (reads manifests, decodes with data's helpers)
    ("megawan.training",),
    ("megawan", "megawan.generation", "megawan.export", "megawan.demo", "megawan.cli", "megawan.__main__",
     "megawan.env_report", "megawan.serve",  # serve: the web page over generation, beside cli (which starts it)
     "megawan.vae_export", "megawan.vae_eval",  # a trained VAE out of its checkpoint; VAEs scored side by side
     "megawan.evaluation"),  # `megawan eval`: generates (generation), scores with demo.shapes' metrics
)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict):
    """The most specific of our modules that `name` (a module, or a module + an attribute) refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: pathlib.Path, modules: dict) -> list:
    """(line, imported module) for every import of one of our modules in `path`, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.append((node.lineno, target))
    return found


def _graph() -> tuple:
    modules = _sources()
    return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def import_cycles(graph: dict) -> list:
    """The strongly connected groups of more than one file (Tarjan), each a sorted list of module names."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str):
    """The index in LAYERS of the most specific prefix that holds `module` (None: in no layer)."""
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and prefix.count(".") > depth and (prefix != "megawan" or module == "megawan"):
                best, depth = i, prefix.count(".")
    return best


def upward_imports(graph: dict, modules: dict) -> list:
    bad = []
    for module, imports in graph.items():
        mine = layer_of(module)
        for line, target in imports:
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{modules[module].relative_to(ROOT)}:{line} ({LAYERS[mine][0]}) imports {target} "
                           f"({LAYERS[theirs][0]}, a higher layer)")
    return bad


def long_files(modules: dict) -> list:
    out = []
    for path in modules.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            out.append(f"{path.relative_to(ROOT)}: {n} lines (> {MAX_LINES})")
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in _sources() if layer_of(m) is None]
    assert not unplaced, f"modules in no layer of LAYERS (place each deliberately): {unplaced}"


def test_no_import_cycles_between_files():
    _, graph = _graph()
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_run_downward_only():
    modules, graph = _graph()
    bad = upward_imports(graph, modules)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_source_file_over_600_lines():
    bad = long_files(_sources())
    assert not bad, "\n".join(bad)


def test_the_checkers_catch_what_they_look_for(tmp_path):
    """The checks themselves can fail: a tiny tree with a cycle and an upward import is caught."""
    graph = {"a": [(1, "b")], "b": [(3, "a")], "c": [(1, "a")]}
    assert import_cycles(graph) == [["a", "b"]]
    modules = {"megawan.parallel.x": ROOT / "megawan/parallel/x.py"}
    graph = {"megawan.parallel.x": [(7, "megawan.models.dit.model")]}
    assert upward_imports(graph, modules) == [
        "megawan/parallel/x.py:7 (megawan.parallel) imports megawan.models.dit.model (megawan.models, a higher layer)"]
    assert layer_of("kernels.dispatch") == 0 and layer_of("megawan.cli") == len(LAYERS) - 1
    assert layer_of("megawan.training.trainer") > layer_of("megawan.data.loader") > layer_of("megawan.models.vae")
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from megawan.models import dit\n")
    found = imports_of("megawan.parallel.m", src, {"megawan.models": None, "megawan.models.dit": None})
    assert found == [(2, "megawan.models.dit")]


if __name__ == "__main__":  # a report of today's shape: python tests/test_architecture.py
    mods, g = _graph()
    for c in import_cycles(g):
        print("cycle:", " <-> ".join(c))
    for b in upward_imports(g, mods):
        print("upward:", b)
    for f in long_files(mods):
        print("long:", f)
    pytest.main([__file__, "-q"])
