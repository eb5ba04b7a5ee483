"""The package's shape: stages import only earlier stages (no cycle), small functions, small modules.

Each module is imported alone, in a fresh interpreter, and every promcse module that import pulls in
must come earlier in :data:`STAGES` (docs/ARCHITECTURE.md explains the order). A new module must be
placed in the list. Imports inside functions (done lazily at call time) are not module-level
dependencies and are not counted.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "promcse"

STAGES: tuple[str, ...] = (
    "errors", "allocator", "files", "schema", "data", "sources", "config",               # inputs
    "backbone", "prompt", "pooling", "model", "encode", "multiprompt",      # the encoder and encoding
    "checkpoint", "released", "onnx_graph", "onnx_runtime", "loading",      # what a model reference means
    "losses", "tiled", "objective",                                         # objectives on embeddings
    "distributed", "gradcache", "step", "teacher", "resume", "loop", "train",  # training
    "sts", "cxc", "plots",                                                  # evaluation
    "shards", "corpus", "ray_encode", "index_kinds",                        # corpus scale: vectors on disk
    "search", "registry", "batching", "metrics", "guards", "serve", "openai_api", "launch", "ray_serve",  # serving
    "export", "onnx_export",                                                # interop
    "mine", "mine_files",                                                   # training data mined with the Index
    "cli",                                                                  # the command line, last
)

PROBE = """
import importlib, json, pkgutil, sys
import promcse
names = sorted(m.name for m in pkgutil.walk_packages(promcse.__path__, "promcse.") if m.name != "promcse.__main__")
graph = {}
for name in names:
    for key in [k for k in sys.modules if k == "promcse" or k.startswith("promcse.")]:
        del sys.modules[key]
    importlib.import_module(name)
    graph[name] = sorted(k for k in sys.modules if k.startswith("promcse.") and k != name)
print(json.dumps(graph))
"""


def stage(module: str) -> str:
    """``promcse.cli.train`` -> ``cli``."""
    return module.split(".")[1]


def test_every_module_imports_only_earlier_stages() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300)
    graph: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    unplaced = sorted({stage(m) for m in graph} - set(STAGES))
    assert not unplaced, f"place these modules in STAGES (and docs/ARCHITECTURE.md): {unplaced}"
    order = {name: i for i, name in enumerate(STAGES)}
    later = [(m, d) for m, deps in graph.items() for d in deps
             if stage(d) != stage(m) and order[stage(d)] >= order[stage(m)]]
    assert not later, f"module imports a later stage (or a cycle): {later}"


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


def test_no_grab_bag_modules() -> None:
    assert not [p for p in SRC.rglob("*.py") if p.stem in {"utils", "helpers", "misc", "common_utils"}]


# Imports of a later stage made inside a function, each for a stated reason (everything else is a cycle).
LAZY_LATER: dict[tuple[str, str], str] = {
    ("config", "model"): "validate() checks pooler/head/mode against the encoder's own registries",
    ("config", "objective"): "validate() checks loss.name against the objectives",
    ("model", "encode"): "SentenceEncoder.encode/similarity are conveniences over promcse.encode",
    ("train", "sts"): "the STS-B dev scorer used for model selection",
    ("sts", "cxc"): "evaluate(..., cxc=...) scores Crisscrossed Captions too",
    ("serve", "openai_api"): "create_app adds the OpenAI routes, which are built on the app's context",
}


def _imported_stages(path: Path) -> set[tuple[str, int]]:
    """Stages imported anywhere in a file (module level and inside functions), with the line."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {(n.split(".")[1], node.lineno) for n in names if n.startswith("promcse.") and n.split(".")[1] in STAGES}
    return found


def test_lazy_imports_of_later_stages_are_only_the_listed_ones() -> None:
    order = {name: i for i, name in enumerate(STAGES)}
    unexpected = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        mine = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if mine not in order:
            continue
        for other, line in _imported_stages(path):
            if order[other] > order[mine] and (mine, other) not in LAZY_LATER:
                unexpected.append(f"{rel}:{line} imports promcse.{other}")
    assert not unexpected, unexpected
