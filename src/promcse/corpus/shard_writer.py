"""One shard's files written as its vectors arrive, a chunk at a time and in any row order (``promcse encode``).

:func:`promcse.corpus.shards.write_shard` writes a shard whose vectors are all in memory (the Ray engine's
actors hand over whole shards). :class:`ShardWriter` writes the same files, byte for byte, while holding only
the chunk in hand: ``promcse encode`` encodes a shard's rows longest first, a chunk at a time
(:mod:`promcse.corpus.encode`), so a shard's vectors come in pieces and out of row order.

Each file is filled under a temporary name beside its final one (``.shard-00003.npy.XXXXXXXX.tmp``, the names of
:func:`promcse.io.files.atomic_write`, which a resumed encode removes):

- ``shard-*.npy`` and (int8) ``shard-*.scales.npy``: the ``.npy`` header for the shard's row count first, then
  each row's bytes at that row's offset (rows quantised one chunk at a time: int8's scales are per vector);
- ``shard-*.rows.jsonl``: appended in row order and hashed as written.

:meth:`ShardWriter.finish` checks that every row came, fsyncs each file, hashes the ``.npy`` files (read back:
their rows were written out of order) and renames each over its final name, in :func:`write_shard`'s order.
Until then only temporaries exist, so a killed encode leaves the shard not done, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from promcse.errors import PromcseError
from promcse.io.files import sha256_file
from promcse.corpus.shards import canonical_dtype, quantize, refuse_non_finite, shard_name


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The header ``numpy.save`` writes for a C-order array of ``shape`` and ``dtype`` (format version 1.0)."""
    from io import BytesIO

    from numpy.lib import format as npy

    buffer = BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                        "shape": shape})
    return buffer.getvalue()


def _temporary(root: Path, name: str) -> tuple[int, Path]:
    """A new temporary file beside ``root/name`` (the names ``atomic_write`` uses): its descriptor and path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
    return fd, Path(tmp)


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class _ArrayFile:
    """A ``.npy`` file of ``shape`` (rows first) filled row by row, in any order, under a temporary name."""

    def __init__(self, root: Path, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.name, self.rows = name, shape[0]
        self.fd, self.tmp = _temporary(root, name)
        header = npy_header(shape, dtype)
        self.offset, self.row_bytes = len(header), np.dtype(dtype).itemsize * int(np.prod(shape[1:]))
        _write_at(self.fd, header, 0)
        os.ftruncate(self.fd, self.offset + self.rows * self.row_bytes)
        self.written = np.zeros(self.rows, dtype=bool)

    def put(self, positions: list[int], values: np.ndarray) -> None:
        """Write row ``positions[k]`` from ``values[k]`` (C-contiguous, the file's dtype)."""
        view = memoryview(np.ascontiguousarray(values).tobytes())
        for k, position in enumerate(positions):
            _write_at(self.fd, view[k * self.row_bytes:(k + 1) * self.row_bytes],
                      self.offset + position * self.row_bytes)
        self.written[positions] = True

    def close(self) -> str:
        """Fsync and close; the sha256 of the whole file."""
        if not self.written.all():
            raise PromcseError(f"{int((~self.written).sum())} of {self.rows} rows were never written",
                               path=self.tmp.parent / self.name)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return sha256_file(self.tmp)


class _RowsFile:
    """The shard's ``rows.jsonl``, appended in row order and hashed as written."""

    def __init__(self, root: Path, name: str, rows: int) -> None:
        self.name, self.rows, self.count, self.size = name, rows, 0, 0
        self.fd, self.tmp = _temporary(root, name)
        self.digest = hashlib.sha256()

    def add(self, ids: list[Any], texts: list[str] | None) -> None:
        """Append the records of the next rows (as :func:`write_shard` writes them)."""
        records = ({"id": i} if texts is None else {"id": i, "text": t} for i, t in zip(ids, texts or ids))
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        self.digest.update(data)
        _write_at(self.fd, data, self.size)
        self.count, self.size = self.count + len(ids), self.size + len(data)

    def close(self) -> str:
        """Fsync and close; the sha256 of what was written."""
        if self.count != self.rows:
            raise PromcseError(f"{self.count} records for {self.rows} rows", path=self.tmp.parent / self.name)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return self.digest.hexdigest()


class ShardWriter:
    """Shard ``index``'s files (``rows`` rows of ``dim``-vectors stored as ``dtype``), filled piece by piece.

    Use as a context manager: leaving it by an exception removes the temporaries. ``put`` vectors in any row
    order, ``add_rows`` in row order, then ``finish`` for the manifest entry (as :func:`write_shard` returns).
    """

    def __init__(self, root: Path, index: int, rows: int, dim: int, dtype: str) -> None:
        self.root, self.index, self.rows, self.dtype = Path(root), index, rows, canonical_dtype(dtype)
        stem = shard_name(index)
        self.files: dict[str, _ArrayFile | _RowsFile] = {}
        try:  # the roles in write_shard's order: the manifest entry lists them so
            self.files["vectors"] = _ArrayFile(self.root, f"{stem}.npy", (rows, dim), self.dtype)
            self.files["rows"] = _RowsFile(self.root, f"{stem}.rows.jsonl", rows)
            if self.dtype == "int8":
                self.files["scales"] = _ArrayFile(self.root, f"{stem}.scales.npy", (rows,), "float32")
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ShardWriter:
        """The writer itself."""
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        """On an exception, :meth:`abort` (which the exception then leaves)."""
        if kind is not None:
            self.abort()

    def put(self, positions: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Store the float vectors of rows ``positions`` (0-based in the shard), quantised to the shard's dtype."""
        where = [int(p) for p in positions]
        if len(where) != len(vectors) or (where and not 0 <= min(where) <= max(where) < self.rows):
            raise PromcseError(f"{len(vectors)} vectors for rows {where[:3]}... of a {self.rows}-row shard",
                               key="positions")
        refuse_non_finite(vectors, self.index, where)
        stored, scales = quantize(vectors, self.dtype)
        self.files["vectors"].put(where, stored)  # type: ignore[union-attr]
        if scales is not None:
            self.files["scales"].put(where, scales)  # type: ignore[union-attr]

    def add_rows(self, ids: list[Any], texts: list[str] | None) -> None:
        """Append the next rows' records (``{"id"}``, or ``{"id", "text"}`` with ``texts``)."""
        self.files["rows"].add(ids, texts)  # type: ignore[union-attr]

    def finish(self, start: int) -> dict[str, Any]:
        """Close, hash and rename every file into place; shard ``index``'s manifest entry (first row ``start``)."""
        entry: dict[str, Any] = {"index": self.index, "start": start, "rows": self.rows, "files": {}}
        hashes = {role: part.close() for role, part in self.files.items()}
        for role, part in self.files.items():
            os.replace(part.tmp, self.root / part.name)
            entry["files"][role] = {"name": part.name, "sha256": hashes[role]}
        return entry

    def abort(self) -> None:
        """Close and remove every temporary (the shard stays not done)."""
        for part in self.files.values():
            if part.fd >= 0:
                os.close(part.fd)
                part.fd = -1
            part.tmp.unlink(missing_ok=True)
