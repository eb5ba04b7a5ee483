"""The package's shape: one folder per stage, each importing only earlier folders; small functions and modules.

Every ``import`` counts: at module level, inside a function (deferred) and under ``TYPE_CHECKING``. Inside a
folder, modules may import each other, but never in a circle. The one documented exception is the package's
public face, ``promcse/__init__.py``, whose lazy ``load`` and ``Index`` reach into later folders.
docs/ARCHITECTURE.md explains the order and what each folder holds (checked by tests/test_architecture_doc.py).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "promcse"

# Earlier first: a module may import its own folder and the folders before it, never one after it.
FOLDERS: tuple[str, ...] = (
    "errors", "version",  # the one error type and the version string (top-level modules, import nothing)
    "_moved",             # the finder that keeps promcse 0.1's documented module paths importable (stdlib only)
    "io",                 # files, artifact schemas, training data and its sources
    "encoder",            # backbone + prompt + pooler -> (B, D), batched encoding, mixed-prompt forward
    "models",             # checkpoints, released prompts, model references, the ONNX graph and runtime
    "objectives",         # losses on embeddings and the objective registry
    "corpus",             # vectors on disk, corpus encoding, index kinds, search, mining
    "evaluation",         # STS, CxC, plots
    "training",           # run config, the loop, one step, distributed, GradCache, teacher, resume
    "serving",            # HTTP app, OpenAI routes, registry, batching engine, guards, metrics, launchers
    "export",             # sentence-transformers / MTEB and ONNX exports
    "cli",                # the command line, last
)
# Top-level files that are not stages: the public face (the one exception: lazy imports of later folders)
# and ``python -m promcse``.
ROOT_FILES = {"__init__", "__main__"}


def folder(module: str) -> str:
    """``promcse.cli.train`` -> ``cli``; ``promcse.errors`` -> ``errors``; ``promcse`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``promcse`` module a file imports, anywhere in it (``from promcse.a import b`` counts
    ``promcse.a.b`` when that is a module, else ``promcse.a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "promcse"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "promcse":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (SRC.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (SRC.parent / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the promcse modules it imports; ``resources/`` (package data) is not code of the package."""
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py")) if "resources" not in p.parts}


def test_shipped_remote_code_is_self_contained() -> None:
    """``resources/modeling_promcse.py`` is copied into sentence-transformers exports: it may not import promcse."""
    assert [imports_of(p) for p in (SRC / "resources").rglob("*.py")] == [set()]


def test_every_module_is_in_a_folder_of_the_order() -> None:
    unplaced = sorted(m for m in graph() if folder(m) not in FOLDERS and folder(m) not in ROOT_FILES)
    assert not unplaced, f"place these in a stage folder (and docs/ARCHITECTURE.md): {unplaced}"


def test_folders_import_only_earlier_folders() -> None:
    order = {name: i for i, name in enumerate(FOLDERS)}
    later = sorted(f"{m} imports {d}" for m, deps in graph().items() if folder(m) in order for d in deps
                   if folder(d) not in order or order[folder(d)] > order[folder(m)])
    assert not later, later


def test_no_import_circles_inside_a_folder() -> None:
    edges = {m: {d for d in deps if d != m and folder(d) == folder(m)} for m, deps in graph().items()
             if folder(m) in FOLDERS}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, set())):
            if state.get(nxt) == 1:  # on the current path: a circle
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, cycles


PROBE = """
import importlib, json, pkgutil, sys
import promcse
names = sorted(m.name for m in pkgutil.walk_packages(promcse.__path__, "promcse.") if m.name != "promcse.__main__")
graph = {}
for name in names:
    for key in [k for k in sys.modules if k == "promcse" or k.startswith("promcse.")]:
        del sys.modules[key]
    importlib.import_module("promcse")
    base = {k for k in sys.modules if k.startswith("promcse.")}  # what the package root itself loads
    importlib.import_module(name)
    graph[name] = sorted(k for k in sys.modules if k.startswith("promcse.") and k != name and k not in base)
print(json.dumps(graph))
"""


def test_importing_a_module_loads_only_earlier_folders() -> None:
    """The runtime view of the same rule: what ``import promcse.X`` actually loads (catches string imports)."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300)
    loaded: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    order = {name: i for i, name in enumerate(FOLDERS)}
    later = [(m, d) for m, deps in loaded.items() if folder(m) in order for d in deps
             if folder(d) in order and order[folder(d)] > order[folder(m)]]
    assert not later, later


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_functions_and_modules_stay_small() -> None:
    too_long: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > 400:
            too_long.append(f"{path.relative_to(SRC)}: {len(source.splitlines())} lines")
        for fn in _functions(ast.parse(source)):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if length > 50:
                too_long.append(f"{path.relative_to(SRC)}:{fn.lineno} {fn.name}: {length} lines")
    assert not too_long, too_long


def test_benchmark_functions_stay_small() -> None:
    bench = SRC.parents[1] / "benchmarks"
    too_long = [f"{p.name}:{fn.lineno} {fn.name}" for p in sorted(bench.glob("*.py"))
                for fn in _functions(ast.parse(p.read_text(encoding="utf-8")))
                if (fn.end_lineno or fn.lineno) - fn.lineno + 1 > 50]
    assert not too_long, too_long


def test_no_grab_bag_modules() -> None:
    assert not [p for p in SRC.rglob("*.py") if p.stem in {"utils", "helpers", "misc", "common_utils"}]
