"""Record the Transformer Engine API that megawan calls directly, read from TE's source, in tests/data/te_api.json.

TE installs only where CUDA is; tests/test_te_contract.py checks megawan's calls into TE (found with `ast` in
megawan/ and kernels/) against this table on any machine. Regenerate it when megawan calls something new in TE
or when the supported TE range moves:

    python tools/te_api_table.py TE_GIT_DIR [--refs v2.9 v2.11 v2.18] [--out tests/data/te_api.json]

TE_GIT_DIR: a clone (bare is fine) of NVIDIA/TransformerEngine; each ref is read with `git show REF:path`, and
the table records the commit each ref named.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REFS = ("v2.9", "v2.11", "v2.18")  # megatron-core 0.16.1's range (2.9 - 2.11) and the newest release
TE = "transformer_engine"


# ----------------------------------------------------------------------------------------------
# signatures from source


def function_params(fn: ast.FunctionDef, drop_self: bool = False) -> list:
    """[{name, kind, default}] of a def, kinds named as inspect.Parameter's (default: whether it has one)."""
    a = fn.args
    positional = a.posonlyargs + a.args
    first_default = len(positional) - len(a.defaults)
    out = [{"name": p.arg, "kind": "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD",
            "default": i >= first_default} for i, p in enumerate(positional)]
    if a.vararg:
        out.append({"name": a.vararg.arg, "kind": "VAR_POSITIONAL", "default": False})
    out += [{"name": p.arg, "kind": "KEYWORD_ONLY", "default": d is not None} for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append({"name": a.kwarg.arg, "kind": "VAR_KEYWORD", "default": False})
    return out[1:] if drop_self else out


def signature(params: list) -> inspect.Signature:
    """The inspect.Signature of recorded params (defaults are placeholders: only their presence matters)."""
    return inspect.Signature([
        inspect.Parameter(p["name"], getattr(inspect.Parameter, p["kind"]),
                          default=None if p["default"] else inspect.Parameter.empty) for p in params])


def _decorator_names(node) -> set:
    names = set()
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return names


def describe(node: ast.AST, classes: dict) -> dict:
    """A def / class of TE as the table records it. classes: the module's classes by name (for dataclass bases)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {"kind": "function", "params": function_params(node)}
    bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
    if "Enum" in bases:
        members = [t.id for s in node.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)]
        return {"kind": "enum", "members": members}
    init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
    if init is not None:
        return {"kind": "class", "params": function_params(init, drop_self=True)}
    if "dataclass" in _decorator_names(node):  # fields: the annotated class attributes, the dataclass bases' first
        fields = []
        for base in bases:
            if base in classes and "dataclass" in _decorator_names(classes[base]):
                fields += describe(classes[base], classes)["params"]
        fields += [{"name": s.target.id, "kind": "POSITIONAL_OR_KEYWORD", "default": s.value is not None}
                   for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        return {"kind": "dataclass", "params": fields}
    raise ValueError(f"{node.name}: no __init__ and not a dataclass; teach describe() its constructor")


# ----------------------------------------------------------------------------------------------
# megawan's references to TE


def te_references(paths) -> list:
    """Every use of a transformer_engine name in these Python files: imports, calls (with their positional
    count and keyword names) and attribute reads, names resolved through the file's import aliases."""
    refs = []
    for path in paths:
        tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == TE:
                        aliases[a.asname or TE] = a.name if a.asname else TE
                        refs.append({"file": str(path), "line": node.lineno, "use": "import", "name": a.name})
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == TE and not node.level:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    refs.append({"file": str(path), "line": node.lineno, "use": "import", "name": node.module,
                                 "imports": a.name})
        inner = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                inner.add(id(node.value))
            elif isinstance(node, ast.Call):
                inner.add(id(node.func))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func, aliases)
                if name:
                    refs.append({"file": str(path), "line": node.lineno, "use": "call", "name": name,
                                 "positional": len(node.args), "keywords": [k.arg for k in node.keywords],
                                 "unpacked": any(isinstance(a, ast.Starred) for a in node.args)
                                 or any(k.arg is None for k in node.keywords)})
            elif isinstance(node, ast.Attribute) and id(node) not in inner:
                name = _dotted(node, aliases)
                if name:
                    refs.append({"file": str(path), "line": node.lineno, "use": "attribute", "name": name})
    return refs


def _dotted(node, aliases: dict):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def megawan_sources() -> list:
    return sorted(p for pkg in ("megawan", "kernels") for p in (ROOT / pkg).rglob("*.py"))


# ----------------------------------------------------------------------------------------------
# reading TE at a ref


class TESource:
    def __init__(self, git_dir: str, ref: str):
        self.git_dir, self.ref = git_dir, ref
        self.commit = self._git("rev-parse", f"{ref}^{{commit}}").strip()
        self.files = set(self._git("ls-tree", "-r", "--name-only", self.commit).split())

    def _git(self, *args) -> str:
        return subprocess.run(["git", "-C", self.git_dir, *args], check=True, capture_output=True, text=True).stdout

    def module_file(self, module: str):
        base = module.replace(".", "/")
        return next((f for f in (f"{base}.py", f"{base}/__init__.py") if f in self.files), None)

    def tree(self, module: str) -> ast.Module:
        return ast.parse(self._git("show", f"{self.commit}:{self.module_file(module)}"))

    def lookup(self, module: str, name: str, depth: int = 0) -> dict:
        """The description of `name` defined in (or re-exported by) `module`."""
        tree = self.tree(module)
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return describe(node, classes)
        for node in tree.body:  # a re-export: from transformer_engine.x import name
            if isinstance(node, ast.ImportFrom) and node.module and depth < 5:
                for a in node.names:
                    if (a.asname or a.name) == name:
                        return self.lookup(node.module, a.name, depth + 1)
        raise KeyError(f"{module}.{name} at {self.ref}")

    def entry_point(self, dotted: str):
        """(entry point, its description) for a dotted name: the longest module prefix, then one definition."""
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if self.module_file(module):
                name = f"{module}.{parts[cut]}"
                return name, self.lookup(module, parts[cut])
        raise KeyError(f"{dotted}: no module of it in TE at {self.ref}")


def build_table(git_dir: str, refs) -> dict:
    used = te_references(megawan_sources())
    modules = sorted({r["name"] for r in used if r["use"] == "import"})
    names = sorted({r["name"] for r in used if r["use"] != "import"} | {
        f"{r['name']}.{r['imports']}" for r in used if r.get("imports")})
    versions = {}
    for ref in refs:
        te = TESource(git_dir, ref)
        entry_points = {}
        for dotted in names:
            if te.module_file(dotted):  # a module imported by name (from transformer_engine.common import recipe)
                continue
            name, description = te.entry_point(dotted)
            entry_points[name] = description
        versions[ref] = {"commit": te.commit, "modules": [m for m in modules if te.module_file(m)],
                         "entry_points": entry_points}
    return {"source": "NVIDIA/TransformerEngine", "generated_by": "tools/te_api_table.py", "versions": versions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("git_dir")
    ap.add_argument("--refs", nargs="+", default=list(DEFAULT_REFS))
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "te_api.json"))
    args = ap.parse_args(argv)
    table = build_table(args.git_dir, args.refs)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    for ref, v in table["versions"].items():
        print(f"{ref} ({v['commit'][:12]}): {', '.join(v['entry_points'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
