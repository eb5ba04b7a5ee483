"""Strict reading of stored model files: the encoder spec in ``config.json`` and safetensors headers.

Everything a checkpoint says is checked before anything is built or allocated: every field's type (a
string is never read as a bool, a float never as an int), its range, the cross-field rules (the prompt's
layers/heads/hidden size equal the backbone's, heads divide the hidden size, the prompt table fits in
memory), and every tensor's name, dtype, shape and byte range in the safetensors header against what the
spec implies. A violation is one :class:`promcse.errors.PromcseError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError
from promcse.io.jsonl import parse_json

MAX_CONFIG_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 64 * 2**20
MAX_PROMPT_ELEMENTS = 2**28  # 1 GiB of fp32 prefix: far above any real prompt (BERT-large P=64: 3.1 M)
SAFETENSORS_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}  # the floating types a prompt may use


def regular_size(path: str | Path, what: str = "read") -> int:
    """Size of ``path``, which must be a regular file: a FIFO, device or directory is refused, never opened
    (reading a FIFO would block forever)."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise PromcseError(f"cannot {what}: {err.strerror}", path=path) from None
    if not stat.S_ISREG(info.st_mode):
        raise PromcseError("not a regular file", path=path)
    return info.st_size


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """Bytes of a regular file of at most ``limit`` bytes (see :func:`regular_size`)."""
    size = regular_size(path)
    if size > limit:
        raise PromcseError(f"file is {size} bytes; at most {limit} expected", path=path)
    with open(path, "rb") as handle:
        return handle.read(limit + 1)


def read_json_object(path: str | Path, limit: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """A JSON object from a regular UTF-8 file."""
    raw = read_regular_file(path, limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PromcseError(f"not valid UTF-8: {err.reason} at byte {err.start}", path=path) from None
    # parse_json: json's limits made errors naming the line (deep nesting, 5,000-digit integers, NaN), not tracebacks
    data = parse_json(text, path)
    if not isinstance(data, dict):
        raise PromcseError(f"expected a JSON object, got {type(data).__name__}", path=path)
    return data


def read_versioned(path: str | Path, fmt: str, max_version: int, what: str) -> dict[str, Any]:
    """A JSON object whose ``format`` is ``fmt`` and whose integer ``format_version`` is at most ``max_version``.

    Raises:
        PromcseError: Missing (naming its folder), not a regular file, over 16 MiB, not UTF-8 JSON or past
            :func:`~promcse.io.jsonl.parse_json`'s limits, not an object, another format, a negative or newer version.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise PromcseError(f"not a promcse {what} (no {path.name})", path=path.parent)
    data = read_json_object(path)
    if data.get("format") != fmt:
        raise PromcseError(f"not a promcse {what} (wrong format field)", path=path, key="format")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PromcseError(f"expected int, got {json.dumps(version)[:40]}", path=path, key="format_version")
    if version < 0:
        raise PromcseError(f"{version} is outside 0..{max_version}", path=path, key="format_version")
    if version > max_version:
        raise PromcseError(f"{what} written by a newer promcse; upgrade to read it", path=path)
    return data


def load_array(path: str | Path, mmap: bool = False) -> Any:
    """A ``.npy`` array (never unpickled; memory-mapped if asked); a FIFO or device is refused, never read."""
    import numpy as np

    regular_size(path, "read vectors")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise PromcseError(f"cannot read vectors: {err}", path=path) from None


def _get(data: dict[str, Any], key: str, kind: type, where: str, default: Any = ..., lo: float | None = None,
         hi: float | None = None) -> Any:
    """``data[key]`` of exactly type ``kind`` within [lo, hi]; ``default`` when absent (else required)."""
    name = f"{where}.{key}"
    if key not in data:
        if default is ...:
            raise PromcseError("missing", key=name)
        return default
    value = data[key]
    ok = (isinstance(value, bool) if kind is bool else isinstance(value, int) and not isinstance(value, bool)
          if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          if kind is float else isinstance(value, kind))
    if not ok:
        raise PromcseError(f"expected {kind.__name__}, got {json.dumps(value)[:60]}", key=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise PromcseError(f"{value} is outside {lo}..{hi}", key=name)
    return float(value) if kind is float else value


def _only(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PromcseError(f"unknown key(s) {unknown}; expected some of {sorted(allowed)}", key=where)


def read_shape(data: Any, where: str = "encoder.shape") -> dict[str, Any]:
    """The backbone shape fields, typed and in range (heads divide the hidden size)."""
    if not isinstance(data, dict):
        raise PromcseError("expected an object", key=where)
    _only(data, {"model_type", "num_layers", "num_heads", "hidden_size", "vocab_size"}, where)
    shape = {"model_type": _get(data, "model_type", str, where), "num_layers": _get(data, "num_layers", int, where, lo=1, hi=512),
             "num_heads": _get(data, "num_heads", int, where, lo=1, hi=1024),
             "hidden_size": _get(data, "hidden_size", int, where, lo=1, hi=65536),
             "vocab_size": _get(data, "vocab_size", int, where, lo=1, hi=50_000_000)}
    if shape["hidden_size"] % shape["num_heads"]:
        raise PromcseError(f"{shape['num_heads']} heads do not divide hidden size {shape['hidden_size']}", key=where)
    return shape


def read_prompt(data: Any, shape: dict[str, Any], where: str = "encoder.prompt") -> dict[str, Any] | None:
    """The prompt spec fields, typed, in range and matching the backbone shape (None: no prompt)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise PromcseError("expected an object or null", key=where)
    _only(data, {"length", "num_layers", "num_heads", "hidden_size", "projection", "projection_hidden", "dropout",
                 "init_std", "shift_positions", "gate"}, where)
    out = {"length": _get(data, "length", int, where, lo=1, hi=4096),
           "projection": _get(data, "projection", bool, where, False),
           "projection_hidden": _get(data, "projection_hidden", int, where, 512, lo=1, hi=65536),
           "dropout": _get(data, "dropout", float, where, 0.1, lo=0.0, hi=0.999),
           "init_std": _get(data, "init_std", float, where, 0.02, lo=0.0, hi=10.0),
           "shift_positions": _get(data, "shift_positions", bool, where, True),
           "gate": _get(data, "gate", bool, where, False)}
    if out["gate"] and out["shift_positions"]:
        raise PromcseError("a gated prompt keeps the backbone's positions: shift_positions must be false",
                           key=f"{where}.gate")
    for key in ("num_layers", "num_heads", "hidden_size"):
        out[key] = _get(data, key, int, where, lo=1)
        if out[key] != shape[key]:
            raise PromcseError(f"{out[key]} differs from the backbone's {shape[key]}", key=f"{where}.{key}")
    if out["length"] * shape["num_layers"] * 2 * shape["hidden_size"] > MAX_PROMPT_ELEMENTS:
        raise PromcseError(f"a prompt of length {out['length']} over this backbone would not fit in memory",
                           key=f"{where}.length")
    return out


def read_encoder(data: Any, where: str = "encoder") -> dict[str, Any]:
    """All :class:`promcse.encoder.model.EncoderSpec` fields from a stored ``encoder`` object, checked."""
    if not isinstance(data, dict):
        raise PromcseError("expected an object", key=where)
    _only(data, {"backbone", "shape", "mode", "prompt", "pooler", "head", "extra"}, where)
    shape = read_shape(data.get("shape"), f"{where}.shape")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise PromcseError("expected an object", key=f"{where}.extra")
    backbone = _get(data, "backbone", str, where)
    if not backbone.strip():
        raise PromcseError("empty backbone reference", key=f"{where}.backbone")
    return {"backbone": backbone, "shape": shape, "mode": _get(data, "mode", str, where, "prompt"),
            "prompt": read_prompt(data.get("prompt"), shape, f"{where}.prompt"),
            "pooler": _get(data, "pooler", str, where, "avg"), "head": _get(data, "head", str, where, "none"),
            "extra": extra}


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names -> (dtype, shape) from a safetensors file's header, every byte range checked against the file.

    Raises:
        PromcseError: Not a regular file, truncated, a header that is not JSON or claims shapes, offsets or
            dtypes that the file cannot hold.
    """
    size = regular_size(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
            raise PromcseError("not a safetensors file (bad or truncated header)", path=path)
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PromcseError("not a safetensors file (header is not JSON)", path=path) from None
    if not isinstance(header, dict):
        raise PromcseError("not a safetensors file (header is not an object)", path=path)
    data_bytes = size - 8 - length
    return {name: _tensor_entry(path, name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"}


def _tensor_entry(path: str | Path, name: str, entry: Any, data_bytes: int) -> tuple[str, tuple[int, ...]]:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        kind = entry.get("dtype") if isinstance(entry, dict) else entry
        raise PromcseError(f"tensor '{name}' has dtype {kind!r}; a prompt is stored as "
                           f"{'/'.join(SAFETENSORS_DTYPES)}", path=path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                                              for d in shape):
        raise PromcseError(f"tensor '{name}' has a bad shape {shape!r}", path=path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
            and offsets[1] - offsets[0] == math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]]):
        raise PromcseError(f"tensor '{name}' claims bytes {offsets!r} that the file does not hold", path=path)
    return entry["dtype"], tuple(shape)
