"""What every ``promcse`` command shares: the runtime options, quiet libraries, and error -> exit status.

Bad input raises :class:`promcse.errors.PromcseError`; :func:`run_command` turns it into a one-paragraph
message on stderr and exit status 2, never a traceback (Ctrl+C: a one-line message and status 130).

The library names what is wrong as the Python user spells it: ``PromcseError(..., key="max_wait_ms")``.
:func:`cli_message` says it as the command line does (``--max-wait-ms: ...``): a key that is the ``dest`` of an
option of the running command, or that the command maps to one (``set_defaults(_key_dests={"path": "output"})``,
for a library name that differs from the option's), is shown as that option.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError


def _quiet_libraries() -> None:
    """Silence transformers' load-time progress bars and warnings; ours are the ones a user needs.

    Hub offline mode is left as the environment sets it (``HF_HUB_OFFLINE``): a model named ``org/name`` comes from
    the cache first and is downloaded only when online (:mod:`promcse.models.hub_resolve`).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def bounded(kind: type, lo: float | None = None, hi: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside [lo, hi] (and NaN/inf).

    Every numeric option of every command uses one, so that e.g. ``--batch-size -1`` stops at parse time
    (exit 2, with the option named) instead of producing garbage much later.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in {lo}..{hi}" if lo is not None else f"<= {hi}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_INT = bounded(int, 0)


def add_common(parser: argparse.ArgumentParser, *, device: bool = True, batch_size: bool = True,
               progress: bool = True, progress_help: str = "hide progress bars") -> None:
    """Add the shared runtime options: ``--device``, ``--batch-size`` and ``--no-progress`` (each optional)."""
    if device:
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    if batch_size:
        parser.add_argument("--batch-size", type=bounded(int, 1, 65536), default=64,
                            help="texts per forward pass (default: 64)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help=progress_help)


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``dest`` -> its long option string (``max_wait_ms`` -> ``--max-wait-ms``) for every option of ``parser``."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest not in (argparse.SUPPRESS, "help"):
            flags.setdefault(action.dest, long[0])
    return flags


def _is_value_of(value: Any, path: str) -> bool:
    """Whether ``path`` is the option value ``value`` (or one of a repeated option's values)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, (str, Path)) and str(v) and Path(v) == Path(path) for v in values)


def cli_message(err: PromcseError, args: argparse.Namespace) -> str:
    """``err`` as the running command says it: its ``key`` shown as the option it stands for, when there is one.

    The key is translated when it is the ``dest`` of one of the command's options (``args._parser``, set by
    :func:`promcse.cli.build_parser`), or maps to one in ``args._key_dests``; and only when the error names no
    file (``--max-wait-ms: message``) or names that option's own value (``--output DIR: message``). A key found
    inside a file, such as a manifest's ``dtype`` or a config file's section, is that file's, not an option.
    """
    parser: argparse.ArgumentParser | None = getattr(args, "_parser", None)
    if err.key is None or parser is None:
        return str(err)
    key_dests: Mapping[str, str] = getattr(args, "_key_dests", None) or {}
    dest = key_dests.get(err.key, err.key)
    flag = option_flags(parser).get(dest)
    if flag is None or (err.path is not None and not _is_value_of(getattr(args, dest, None), err.path)):
        return str(err)
    where = [flag if err.path is None else f"{flag} {err.path}"]
    if err.line is not None:
        where.append(f"line {err.line}")
    if err.column is not None:
        where.append(f"column {err.column}")
    return f"{', '.join(where)}: {err.message}"


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (``args.func``); PromcseError -> exit status 2, KeyboardInterrupt -> 130."""
    try:
        return int(args.func(args))
    except PromcseError as err:
        print(f"promcse {args.command}: error: {cli_message(err, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"promcse {args.command}: interrupted", file=sys.stderr)
        return 130
