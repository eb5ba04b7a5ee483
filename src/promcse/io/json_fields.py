"""Strict reading of the JSON files promcse writes beside vectors: an index's ``meta.json``, a shard manifest.

Both are read by :func:`promcse.io.schema.read_versioned` (format, version, and the limits of
:func:`promcse.io.jsonl.parse_json`: nesting, integer digits, no ``NaN``); then every field is checked for its exact type (a string is never an int, a bool never a number, a float never
an int) and range before anything uses it. A violation is one :class:`~promcse.errors.PromcseError` naming the
file and the key, dotted for nested fields (``store.path``, ``shards[3].rows``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

MAX_INT = 2**31 - 1  # FAISS keeps its search and build settings in C ints
MAX_ROWS = 2**40  # rows of one corpus or index: far above any real one
MAX_DIM = 2**16  # vector size
SHA256 = re.compile(r"[0-9a-f]{64}")
REQUIRED: Any = object()  # the default of :func:`checked` for a key that must be present
_TYPE_NAMES = {bool: "bool", int: "int", str: "string", dict: "object", list: "array"}


def shown(value: Any) -> str:
    """A parsed JSON value as a short text for messages."""
    return json.dumps(value, ensure_ascii=False)[:60]


def name_of(where: str, key: str | int) -> str:
    """The dotted key of a field: ``store`` + ``path`` -> ``store.path``, ``shards`` + 3 -> ``shards[3]``."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def checked(data: dict[str, Any], key: str, kind: type, path: str | Path, *, where: str = "",
            lo: int | None = None, hi: int | None = None, null: bool = False, choices: Collection[Any] = (),
            default: Any = REQUIRED) -> Any:
    """``data[key]``, of exactly type ``kind`` (or None where ``null``), within ``lo..hi``, one of ``choices``.

    Args:
        data: The object holding the field.
        key: The field's name.
        kind: ``int``, ``bool``, ``str``, ``dict`` or ``list``.
        path: The file, for messages.
        where: The dotted key of ``data`` inside the file ('' at the top).
        lo, hi: Inclusive bounds of an int.
        null: Accept ``null``.
        choices: The values allowed (empty: any).
        default: Returned when the key is absent (:data:`REQUIRED`: absence is an error).
    """
    name = name_of(where, key)
    if key not in data:
        if default is REQUIRED:
            raise PromcseError("missing", path=path, key=name)
        return default
    value = data[key]
    if value is None and null:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = _TYPE_NAMES.get(kind, kind.__name__) + (" or null" if null else "")
        raise PromcseError(f"expected {expected}, got {shown(value)}", path=path, key=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise PromcseError(f"{shown(value)} is outside {lo}..{hi}", path=path, key=name)
    if choices and value not in choices:
        raise PromcseError(f"{shown(value)} is not one of {', '.join(map(shown, choices))}", path=path, key=name)
    return value


def only(data: dict[str, Any], allowed: Collection[str], path: str | Path, where: str = "") -> None:
    """Refuse keys of ``data`` outside ``allowed``, naming the first one."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise PromcseError(f"unknown key; expected some of {', '.join(sorted(allowed))}", path=path,
                           key=name_of(where, unknown[0]))


def plain_name(value: Any, path: str | Path, key: str) -> str:
    """A file name inside the directory (no folder part, not ``.`` or ``..``)."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value \
            or "\0" in value:
        raise PromcseError(f"expected a plain file name, got {shown(value)}", path=path, key=key)
    return value


def sha256_hex(value: Any, path: str | Path, key: str) -> str:
    """A sha256 as 64 lowercase hex digits."""
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise PromcseError(f"expected a sha256 (64 hex digits), got {shown(value)}", path=path, key=key)
    return value


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, so that it dumps as strict JSON
    (``json.dumps`` would write ``NaN``, which no strict reader, promcse's included, accepts)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps_strict(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (non-finite floats as ``null``; see :func:`finite_json`)."""
    return json.dumps(finite_json(value), indent=indent, allow_nan=False)
