"""What every ``promcse`` command shares: the runtime options, quiet libraries, and error -> exit status.

Bad input raises :class:`promcse.errors.PromcseError`; :func:`run_command` turns it into a one-paragraph
message on stderr and exit status 2, never a traceback (Ctrl+C: a one-line message and status 130).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from promcse.errors import PromcseError


def _quiet_libraries() -> None:
    """Silence transformers' load-time progress bars and warnings; ours are the ones a user needs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (``args.func``); PromcseError -> exit status 2, KeyboardInterrupt -> 130."""
    try:
        return int(args.func(args))
    except PromcseError as err:
        print(f"promcse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"promcse {args.command}: interrupted", file=sys.stderr)
        return 130
