"""docs/ARCHITECTURE.md names every module of the package, and the docs name only modules that exist.

- Every module file under ``src/promcse`` (not ``resources/``, ``__init__.py`` or ``__main__.py``) is named on the
  architecture page by its path relative to ``src/promcse``, in backticks: ``corpus/search.py``, ``errors.py``.
- Every backticked module path (``something.py``) and, on the architecture page, folder path (``folder/``) exists,
  relative to ``src/promcse`` (or to the repository for ``tests/``, ``benchmarks/``... and ``src/promcse/...``).
- Every dotted reference ``promcse.a.b.c`` in README.md and docs/*.md resolves: ``promcse.a.b`` is the longest
  prefix that is a module, and ``c`` is defined at the top of its source (``def c``, ``class c``, ``c =``; a
  further ``.d`` is defined anywhere in it). The package root also exports the names of its ``__all__``.
  Old flat paths (``promcse.sts``) may appear only in a sentence that calls them deprecated.

Sources are read as text: nothing of promcse is imported, so the check is fast.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "promcse"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A path whose first part is one of these is relative to the repository, not to src/promcse.
REPO_DIRS = {"tests", "benchmarks", "experiments", "docs", "configs", "checkpoints", "src"}
# ``promcse.json``, ``.promcse.lock``: file names, not dotted references.
FILE_SUFFIXES = {"json", "jsonl", "lock", "py", "yaml", "yml", "txt", "csv", "tsv", "npy", "md", "html",
                 "safetensors", "onnx", "toml", "cfg", "bin"}
BACKTICKS = re.compile(r"`([^`\n]+)`")
PATH_TOKEN = re.compile(r"[A-Za-z0-9_.\-/]+")
DOTTED = re.compile(r"(?<![\w.\-/])promcse(?:\.[A-Za-z_]\w*)+")
DEPRECATED = re.compile(r"deprecat", re.IGNORECASE)


def package_modules(src: Path) -> list[str]:
    """Every module file of the package, as its path relative to ``src`` (``corpus/search.py``)."""
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py")
                  if "resources" not in p.relative_to(src).parts and p.name not in {"__init__.py", "__main__.py"})


def backticked_paths(text: str) -> set[str]:
    """Every path-like token inside backticks, ``src/promcse/`` stripped (not in spans with a ``<placeholder>``)."""
    tokens = {t for span in BACKTICKS.findall(text) if "<" not in span for t in PATH_TOKEN.findall(span)}
    return {t.removeprefix("src/promcse/") for t in tokens}


def unlisted_modules(text: str, src: Path) -> list[str]:
    """The modules of ``src`` that ``text`` does not name by their path."""
    named = backticked_paths(text)
    return [m for m in package_modules(src) if m not in named]


def missing_paths(text: str, src: Path, root: Path, folders: bool) -> list[str]:
    """Backticked ``.py`` paths (and, with ``folders``, ``folder/`` paths) that do not exist.

    A path starting with a repository folder (``tests/``...) is looked up in ``root``; any other in ``src``. With
    ``folders`` (the architecture page) every path must exist; elsewhere a bare file name (``tool.py``, another
    project's) is let be, but a path into the package (``cli/common.py``) must exist.
    """
    top = {p.name for p in src.iterdir() if p.is_dir()}
    missing: list[str] = []
    for path in sorted(backticked_paths(text)):
        is_folder = path.endswith("/") and not path.startswith("/") and path != "/"
        if not (path.endswith(".py") or (folders and is_folder)):
            continue
        first = path.split("/")[0]
        base = root if first in REPO_DIRS else src
        if (base / path).exists():
            continue
        if folders or base is root or first in top:
            missing.append(path)
    return missing


def module_file(src: Path, parts: list[str]) -> Path | None:
    """The source file of module ``promcse.<parts>`` (``parts`` may be empty: the package root), if it exists."""
    base = src.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if parts and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def top_level_names(source: str, package_root: bool) -> set[str]:
    """Names a module defines at its top level (and, for the package root, the names of its ``__all__``)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
            exported = isinstance(node.value, (ast.List, ast.Tuple)) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in targets)
            if package_root and exported:
                names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return names


def defined_anywhere(source: str, name: str) -> bool:
    """``def name``, ``class name``, ``name =``, ``self.name =`` or a field ``name:`` anywhere in ``source``."""
    pattern = rf"^\s*(?:(?:async\s+)?def\s+{name}\b|class\s+{name}\b|(?:self\.)?{name}\s*(?::|=(?!=)))"
    return re.search(pattern, source, re.MULTILINE) is not None


def resolve(reference: str, src: Path) -> str | None:
    """Why ``promcse.a.b.c`` does not resolve in ``src`` (None when it does)."""
    parts = reference.split(".")[1:]
    for cut in range(len(parts), -1, -1):
        path = module_file(src, parts[:cut])
        if path is not None:
            break
    else:
        return "no such module"
    rest = parts[cut:]
    if not rest:
        return None
    source = path.read_text(encoding="utf-8")
    module = ".".join(["promcse", *parts[:cut]])
    if rest[0] not in top_level_names(source, package_root=cut == 0):
        return f"{module} defines no {rest[0]!r}"
    missing = [name for name in rest[1:] if not defined_anywhere(source, name)]
    return f"{module} defines no {missing[0]!r}" if missing else None


def sentences(text: str) -> list[str]:
    """The text's sentences, paragraph by paragraph (a dotted reference holds no whitespace, so it stays whole)."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        out += re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split()))
    return out


def bad_references(text: str, src: Path) -> list[str]:
    """``reference: why`` for every dotted ``promcse.`` reference that does not resolve (deprecated aliases aside)."""
    bad: list[str] = []
    for sentence in sentences(text):
        for reference in DOTTED.findall(sentence):
            if reference.rsplit(".", 1)[1] in FILE_SUFFIXES and reference.count(".") == 1:
                continue  # a file name such as promcse.json
            why = resolve(reference, src)
            if why is not None and not DEPRECATED.search(sentence):
                bad.append(f"{reference}: {why}")
    return sorted(set(bad))


def doc_problems(page: Path, src: Path = SRC, root: Path = ROOT, architecture: bool = False) -> list[str]:
    """Everything wrong with one page: unresolved references and paths (and, for the architecture page,
    modules it does not name)."""
    text = page.read_text(encoding="utf-8")
    problems = [f"not on the page: {m}" for m in unlisted_modules(text, src)] if architecture else []
    problems += [f"no such path: {p}" for p in missing_paths(text, src, root, folders=architecture)]
    return problems + bad_references(text, src)


def folder_order() -> tuple[str, ...]:
    """``FOLDERS`` of tests/test_architecture.py, read from its source (no import)."""
    tree = ast.parse((ROOT / "tests" / "test_architecture.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "FOLDERS":
            return tuple(ast.literal_eval(node.value))  # type: ignore[arg-type]
    raise AssertionError("FOLDERS not found in tests/test_architecture.py")


# --- the real pages -------------------------------------------------------------------------------------------


def test_the_architecture_page_names_every_module_and_only_real_ones() -> None:
    assert doc_problems(ARCHITECTURE, architecture=True) == []


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_reference_in_the_docs_resolves(page: Path) -> None:
    assert doc_problems(page) == []


def test_the_architecture_page_follows_the_folder_order() -> None:
    """Each folder of ``FOLDERS`` heads a section (``### `io/` ``; top-level modules as ``errors.py``), in order."""
    headings = [line for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines() if line.startswith("#")]

    def first(name: str) -> int:
        hits = [i for i, line in enumerate(headings) if f"`{name}/`" in line or f"`{name}.py`" in line]
        assert hits, f"no section heading names {name}"
        return hits[0]

    positions = [first(name) for name in folder_order()]
    assert positions == sorted(positions), list(zip(folder_order(), positions))


# --- the checker itself, on a fake tree -----------------------------------------------------------------------


def fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny repository: src/promcse with a root, two modules, a folder, resources and a tests folder."""
    root = tmp_path / "repo"
    src = root / "src" / "promcse"
    files = {
        "__init__.py": '__all__ = ["load", "Index"]\n\ndef load(m):\n    return m\n',
        "__main__.py": "",
        "errors.py": "class PromcseError(Exception):\n    pass\n",
        "io/__init__.py": '"""Inputs."""\n',
        "io/files.py": ("LIMIT = 3\n\ndef atomic_write(path):\n    local = 1\n\n"
                        "class Lock:\n    depth: int = 0\n\n    def acquire(self):\n        self.owner = 1\n"),
        "resources/modeling_x.py": "",
    }
    for name, body in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(body, encoding="utf-8")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("", encoding="utf-8")
    return src, root


GOOD_PAGE = """# Fake

- `errors.py`: `PromcseError`.
- `io/files.py`: `promcse.io.files.atomic_write`, `promcse.io.files.LIMIT` and `promcse.io.files.Lock.acquire`
  (also `promcse.io.files.Lock.owner`, `promcse.io.files.Lock.depth`); see `tests/test_x.py` and `io/`.
- `promcse.load`, `promcse.Index`, `promcse.errors.PromcseError`, and `promcse.io`.
- `src/promcse/io/files.py`, `<folder>/<module>.py` (a placeholder), and `resources/modeling_x.py`, which is
  copied into exports.
- Names that are files: `promcse.json`, `.promcse.lock`, `modeling_promcse.py`, a bare `tool.py`.

Old paths such as `promcse.files` are deprecated aliases of the new ones.
"""


def test_the_checker_passes_a_good_page(tmp_path: Path) -> None:
    src, root = fake_tree(tmp_path)
    page = tmp_path / "page.md"
    page.write_text(GOOD_PAGE, encoding="utf-8")
    assert package_modules(src) == ["errors.py", "io/files.py"]
    assert doc_problems(page, src, root, architecture=True) == [
        "no such path: modeling_promcse.py", "no such path: tool.py"]  # the page itself must name real paths
    page.write_text(GOOD_PAGE.replace("`modeling_promcse.py`, a bare `tool.py`", "more"), encoding="utf-8")
    assert doc_problems(page, src, root, architecture=True) == []
    page.write_text(GOOD_PAGE, encoding="utf-8")
    assert doc_problems(page, src, root) == []  # other docs may name other projects' files


@pytest.mark.parametrize(("change", "problem"), [
    (("- `errors.py`: `PromcseError`.\n", ""), "not on the page: errors.py"),
    (("`io/files.py`:", "the files module:"), None),  # still named as src/promcse/io/files.py
    (("`io/`", "`nothing/`"), "no such path: nothing/"),
    (("`tests/test_x.py`", "`tests/test_y.py`"), "no such path: tests/test_y.py"),
    (("`resources/modeling_x.py`", "`io/gone.py`"), "no such path: io/gone.py"),
    (("promcse.io.files.atomic_write", "promcse.io.files.atomic_rite"), "promcse.io.files.atomic_rite: promcse.io.files defines no 'atomic_rite'"),
    (("promcse.io.files.LIMIT", "promcse.io.files.local"), "promcse.io.files.local: promcse.io.files defines no 'local'"),
    (("promcse.io.files.Lock.acquire", "promcse.io.files.Lock.release"), "promcse.io.files.Lock.release: promcse.io.files defines no 'release'"),
    (("promcse.io`", "promcse.io.data`"), "promcse.io.data: promcse.io defines no 'data'"),
    (("promcse.Index", "promcse.Search"), "promcse.Search: promcse defines no 'Search'"),
    (("are deprecated aliases", "are the old ones"), "promcse.files: promcse defines no 'files'"),
])
def test_the_checker_finds_each_kind_of_mistake(tmp_path: Path, change: tuple[str, str], problem: str | None) -> None:
    src, root = fake_tree(tmp_path)
    page = tmp_path / "page.md"
    text = GOOD_PAGE.replace("`modeling_promcse.py`, a bare `tool.py`", "more")
    assert change[0] in text
    page.write_text(text.replace(*change), encoding="utf-8")
    assert doc_problems(page, src, root, architecture=True) == ([] if problem is None else [problem])


def test_the_checker_fails_a_broken_copy_of_the_real_page(tmp_path: Path) -> None:
    """The real page with one module left out and one stale reference put in: both are reported."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines(keepends=True) if "`serving/context.py`" not in line]
    broken = tmp_path / "ARCHITECTURE.md"
    broken.write_text("".join(lines) + "\nTests use `promcse.serving.app.BackgroundServer` and `serving/serve.py`.\n",
                      encoding="utf-8")
    problems = doc_problems(broken, architecture=True)
    assert "not on the page: serving/context.py" in problems
    assert "no such path: serving/serve.py" in problems
    assert "promcse.serving.app.BackgroundServer: promcse.serving.app defines no 'BackgroundServer'" in problems
