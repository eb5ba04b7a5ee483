"""The command line lives in ``promcse.cli`` only: the library never imports argparse nor names a ``--flag`` in
its messages (the CLI shows an error's key as its option), and every command's ``--help`` works."""

from __future__ import annotations

import ast
import re
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
    assert {"train", "encode", "eval", "compare", "quickstart", "index", "index build", "index search", "serve",
            "export", "mine", "pair", "push"} <= names


@pytest.mark.parametrize("command", [[], *subcommands()], ids=lambda c: " ".join(c) or "promcse")
def test_help_exits_0(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        promcse.cli.main([*command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: promcse") and "--help" in out


# The library names what is wrong as a Python caller spells it (a field or an argument); only ``promcse.cli``
# speaks in ``--flags``. A flag is ``--`` then a letter, at the start of a text or after a space, bracket,
# quote or backtick (so ``a--b`` or an em dash written ``--`` before a space are not flags).
FLAG = re.compile(r"(^|[\s('\"`])--[a-z]")
MESSAGE_CALLS = {"PromcseError", "ValueError", "TypeError", "print"}
NAMING_ARGUMENTS = {"key", "label"}


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def message_parts(tree: ast.AST) -> list[ast.Constant]:
    """Every string constant (f-string parts included) in the arguments of a PromcseError / ValueError /
    TypeError / print call, in any ``key=`` or ``label=`` argument or parameter default, and in what a ``for``
    loop that raises or prints such a message iterates over (``for name, value in (("--margin", m), ...)``)."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and any(isinstance(c, ast.Call) and _callee(c) in MESSAGE_CALLS
                                             for statement in node.body for c in ast.walk(statement)):
            roots.append(node.iter)
        if isinstance(node, ast.Call):
            if _callee(node) in MESSAGE_CALLS:
                roots += [*node.args, *(k.value for k in node.keywords)]
            roots += [k.value for k in node.keywords if k.arg in NAMING_ARGUMENTS]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            defaults = [*zip(positional[len(positional) - len(args.defaults):], args.defaults),
                        *((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)]
            roots += [default for arg, default in defaults if arg.arg in NAMING_ARGUMENTS]
    found = {id(c): c for root in roots for c in ast.walk(root)
             if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return sorted(found.values(), key=lambda c: (c.lineno, c.col_offset))


def flag_mentions(root: Path) -> list[str]:
    """``file:line: text`` for every message part of a library module under ``root`` that names a ``--flag``."""
    found: list[str] = []
    for path in sorted(p for p in root.rglob("*.py") if root / "cli" not in p.parents):
        relative = path.relative_to(root).as_posix()
        for part in message_parts(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if FLAG.search(part.value):
                found.append(f"{relative}:{part.lineno}: {part.value!r}")
    return found


def test_library_messages_name_no_flags() -> None:
    assert flag_mentions(PACKAGE) == []


def test_the_flag_scan_finds_flags(tmp_path: Path) -> None:
    """The scan itself: it sees the ways a flag used to reach a library message, and lets the rest be."""
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "x.py").write_text('raise PromcseError("--port must be in 1..65535")\n')  # the CLI may
    (tmp_path / "lib.py").write_text(
        '"""Docstrings may say ``promcse encode --output DIR``."""\n'
        'def check(port, label: str = "--output"):\n'
        '    raise PromcseError(f"--port must be in 1..65535, got {port}")\n'
        'raise PromcseError("bad", key="--also")\n'
        'print(f"warning: open to all ({port}, --insecure)")\n'
        'raise ValueError("fine: max_wait_ms, a--b and -- em dashes")\n'
        'x = "--not-a-message"\n'
        'for option, value in (("--margin", 1.0), ("max_score", 2.0)):\n'
        '    raise PromcseError(f"{option} must be finite, got {value}")\n')
    assert [line.split(":")[1] for line in flag_mentions(tmp_path)] == ["2", "3", "4", "5", "8"]


def test_a_library_key_is_shown_as_the_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """End to end: errors raised in the library with ``key=`` come out of the CLI naming the flag."""
    from promcse.cli import main

    # MineConfig.validate: key "per_anchor" -> --per-anchor (before any file or model is read)
    argv = ["mine", "--input", str(tmp_path / "p.csv"), "--output", str(tmp_path / "o.csv"), "--range", "1-3",
            "--per-anchor", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("promcse mine: error: --per-anchor: 5 negatives per row") and "key '" not in err, err
    # promcse.io.files.check_output_file: key "output", the path being that option's value -> "--output PATH: ..."
    (tmp_path / "d.npy").mkdir()
    (tmp_path / "s.txt").write_text("a\n", encoding="utf-8")
    argv = ["encode", "--model", "unused", "--input", str(tmp_path / "s.txt"), "--output", str(tmp_path / "d.npy")]
    assert main(argv) == 2
    assert f"promcse encode: error: --output {tmp_path / 'd.npy'}: is an existing directory" in capsys.readouterr().err
    # promcse.models.onnx_runtime.check_device: key "device" -> --device
    argv[-1] = str(tmp_path / "v.npy")
    assert main([*argv, "--backend", "onnx", "--device", "cuda"]) == 2
    assert "promcse encode: error: --device: the ONNX backend runs on the CPU" in capsys.readouterr().err


def test_cli_message_translates_keys_of_the_running_command_only() -> None:
    from promcse.cli.common import cli_message
    from promcse.errors import PromcseError

    serve = promcse.cli.build_parser().parse_args(["serve", "--model", "m=minilm"])
    late = PromcseError("must be in 0..10000, got 20000", key="max_wait_ms")  # EngineConfig.max_wait_ms
    assert str(late) == "key 'max_wait_ms': must be in 0..10000, got 20000"  # as the library says it
    assert cli_message(late, serve) == "--max-wait-ms: must be in 0..10000, got 20000"
    mapped = PromcseError("must be in (0, 86400] seconds, got 0", key="keep_alive_s")  # ServeOptions.keep_alive_s
    assert cli_message(mapped, serve) == "--keep-alive-timeout: must be in (0, 86400] seconds, got 0"
    assert cli_message(PromcseError("x", key="model.prompt_gate"), serve) == "key 'model.prompt_gate': x"
    build = promcse.cli.build_parser().parse_args(["index", "build", "--model", "m", "--output", "idx"])
    assert cli_message(PromcseError("too few", key="nlist"), build) == "--nlist: too few"  # the nested subcommand's
    # a key found inside a file (a manifest's "model") is that file's, not the --model option
    inside = PromcseError("expected str", path="vectors/manifest.json", key="model")
    assert cli_message(inside, build) == "vectors/manifest.json, key 'model': expected str"
    train = promcse.cli.build_parser().parse_args(["train", "--config", "c.yaml", "--output", "o"])
    section = PromcseError("unknown section", path="c.yaml", key="output")  # a section of the --config file
    assert cli_message(section, train) == "c.yaml, key 'output': unknown section"
    own = PromcseError("is an existing directory", path="o", key="output")
    assert cli_message(own, train) == "--output o: is an existing directory"


def test_serve_without_its_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: importing it raises ImportError
    assert promcse.cli.main(["serve", "--model", "m=minilm"]) == 2
    err = capsys.readouterr().err
    assert "needs uvicorn" in err and "pip install 'promcse[serve]'" in err and "Traceback" not in err
