"""The one JSON Lines reader: streamed, strict UTF-8, one JSON object a line, every error naming file and line.

Every ``.jsonl`` that promcse reads goes through :func:`iter_jsonl`: training files, corpora, shard row files,
index texts, teacher caches. Lines are split on ``\\n`` only (JSON strings may hold U+2028 and other separators
unescaped), blank lines are skipped, and what ``json`` would turn into a traceback or a silently huge value is
refused with the place named: nesting deeper than :data:`MAX_DEPTH` (``RecursionError`` in ``json``), integers
longer than :data:`MAX_INT_DIGITS` digits (Python's int-conversion limit), and ``NaN``/``Infinity`` (not JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

MAX_DEPTH = 64  # nesting of arrays/objects in one line; real rows use 1-2
MAX_INT_DIGITS = 64  # an id or count longer than this is garbage, not data


def decoded_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line break) of a strict UTF-8 file, streamed; a BOM is dropped.

    Raises:
        PromcseError: A missing file, a directory, or bytes that are not UTF-8 (the line is named).
    """
    p = Path(path)
    if not p.is_file():
        raise PromcseError("file not found" if not p.exists() else "not a regular file", path=p)
    with open(p, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PromcseError(f"not valid UTF-8: byte 0x{raw[err.start]:02x}", path=p, line=number) from None
            line = line.removeprefix("\ufeff") if number == 1 else line
            yield number, line.removesuffix("\n").removesuffix("\r")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """Nesting depth of a parsed value, iteratively (no recursion limit of its own)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str, path: str | Path, line: int | None = None) -> Any:
    """``json.loads`` with the limits above; every failure is a :class:`PromcseError` naming ``path``/``line``."""
    try:
        value = json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError:
        raise PromcseError(f"JSON nested deeper than {MAX_DEPTH} levels", path=path, line=line) from None
    except json.JSONDecodeError as err:
        raise PromcseError(f"invalid JSON: {err.msg}", path=path, line=line, column=err.colno) from None
    except ValueError as err:
        raise PromcseError(f"invalid JSON: {err}", path=path, line=line) from None
    if _depth(value) > MAX_DEPTH:
        raise PromcseError(f"JSON nested deeper than {MAX_DEPTH} levels", path=path, line=line)
    return value


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(line number, object)`` over a JSON Lines file; blank lines are skipped.

    Raises:
        PromcseError: Not UTF-8, invalid JSON, a line that is not an object, or a value past the limits.
    """
    for number, line in decoded_lines(path):
        if not line.strip():
            continue
        obj = parse_json(line, path, number)
        if not isinstance(obj, dict):
            raise PromcseError("each line must be a JSON object", path=path, line=number)
        yield number, obj
