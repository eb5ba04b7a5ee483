"""``promcse`` command line: a thin shell over the library's functions.

One module per command group (:mod:`~promcse.cli.train` for ``train`` and ``quickstart``,
:mod:`~promcse.cli.encode`, :mod:`~promcse.cli.eval`, :mod:`~promcse.cli.compare`, :mod:`~promcse.cli.index`,
:mod:`~promcse.cli.serve`, :mod:`~promcse.cli.export`, :mod:`~promcse.cli.mine`, :mod:`~promcse.cli.push`), each with ``register(subparsers)`` and its ``cmd_*`` functions; the shared
options and the error -> exit status mapping are in :mod:`~promcse.cli.common`. Only this package parses
argv: the library modules take typed arguments.

Bad input raises :class:`promcse.errors.PromcseError`; here it becomes a one-paragraph message on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from promcse.cli import adapt, compare, encode, export, index, mine, pair, push, serve, train
from promcse.cli import eval as eval_
from promcse.cli.common import _quiet_libraries, run_command

__all__ = ["build_parser", "main"]

# Each command group adds its subcommands to the ``promcse`` subparsers, in this order.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    train.register, encode.register, eval_.register, compare.register, index.register, serve.register,
    export.register, mine.register, pair.register, adapt.register, push.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help)."""
    from promcse.version import __version__

    parser = argparse.ArgumentParser(
        prog="promcse",
        description="Train, evaluate and serve sentence embeddings: deep soft prompts on a frozen encoder "
        "(PromCSE) or full fine-tuning (SimCSE). MODEL is a checkpoint directory, a Hugging Face name or "
        "path, or 'minilm' (the bundled all-MiniLM-L6-v2).",
    )
    parser.add_argument("--version", action="version", version=f"promcse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """``set_defaults(_parser=...)`` on every subcommand (the innermost wins), so that
    :func:`~promcse.cli.common.run_command` can name a library error's key as that command's option."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_parser=sub)
                _remember_parsers(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, map PromcseError to exit status 2."""
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    return run_command(args)
