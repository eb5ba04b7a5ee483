"""The command line lives in ``promcse.cli`` only: the library never imports argparse, and every
command's ``--help`` works."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import promcse
import promcse.cli

PACKAGE = Path(promcse.__file__).parent
CLI = PACKAGE / "cli"


def library_modules() -> list[Path]:
    """Every module of ``promcse`` outside the ``promcse.cli`` package."""
    return sorted(p for p in PACKAGE.rglob("*.py") if CLI not in p.parents)


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of the modules a syntax tree imports (``import a.b`` and ``from a.b import c``: ``a``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_does_not_import_argparse() -> None:
    modules = library_modules()
    assert PACKAGE / "corpus" / "search.py" in modules and PACKAGE / "serving" / "app.py" in modules and PACKAGE / "export" / "sentence_transformers.py" in modules
    offenders = [str(p.relative_to(PACKAGE)) for p in modules
                 if "argparse" in imported_modules(ast.parse(p.read_text(encoding="utf-8"), filename=str(p)))]
    assert offenders == []


def subcommands() -> list[list[str]]:
    """Every command path under ``promcse``, e.g. ``["index", "build"]``, read from the parser."""
    import argparse

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found: list[list[str]] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append([*prefix, name])
                    found += walk(sub, [*prefix, name])
        return found

    return walk(promcse.cli.build_parser(), [])


def test_every_command_is_listed() -> None:
    names = {" ".join(c) for c in subcommands()}
    assert {"train", "encode", "eval", "quickstart", "index", "index build", "index search", "serve",
            "export", "mine"} <= names


@pytest.mark.parametrize("command", [[], *subcommands()], ids=lambda c: " ".join(c) or "promcse")
def test_help_exits_0(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        promcse.cli.main([*command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: promcse") and "--help" in out
