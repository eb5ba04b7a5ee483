"""The corpus embedding cache of retrieval evaluation: a corpus is encoded once per document encoder.

An entry is ``<key>.npy`` (the unit-length float32 vectors of the corpus's non-empty documents, in corpus order)
and ``<key>.json`` (its record: format, version, the key's parts, the shape and the sha256 of the ``.npy``),
under :func:`default_cache_dir` (``$PROMCSE_CACHE_DIR/embeddings``, else ``$XDG_CACHE_HOME/promcse/embeddings``,
else ``~/.cache/promcse/embeddings``). The key (:func:`cache_key`) is a sha256 of the document encoder's
fingerprint (:mod:`promcse.evaluation.fingerprint`, or the caller's), the corpus file's sha256, the rule that makes
a document's text, and the token limit. Both files are written atomically, the vectors first and the record last,
so a record always describes whole vectors. On read the record, the shape and the checksum are verified; an entry
that fails (a truncated or edited file, a foreign record) is recomputed and rewritten, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from promcse.errors import PromcseError
from promcse.io.files import atomic_write, atomic_write_text, cache_home, sha256_file
from promcse.io.schema import load_array, read_json_object

FORMAT = "promcse-embedding-cache"
VERSION = 1


def default_cache_dir() -> Path:
    """``embeddings`` under promcse's cache folder (:func:`promcse.io.files.cache_home`)."""
    return cache_home() / "embeddings"


def cache_parts(fingerprint: str, corpus_sha256: str, text_rule: str, max_length: int | None) -> dict[str, Any]:
    """What a cache entry's vectors depend on (the record stores them; :func:`cache_key` hashes them)."""
    return {"model": fingerprint, "corpus_sha256": corpus_sha256, "documents": text_rule, "max_length": max_length}


def cache_key(parts: dict[str, Any]) -> str:
    """The entry's file stem: 32 hex digits of the sha256 of its parts and the format."""
    payload = json.dumps({"format": FORMAT, "version": VERSION, **parts}, sort_keys=True).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:32]


def _check_entry(directory: Path, key: str, parts: dict[str, Any], rows: int) -> np.ndarray:
    """The entry's vectors, every check passed; raises :class:`PromcseError` naming what failed."""
    record_path, npy_path = directory / f"{key}.json", directory / f"{key}.npy"
    record = read_json_object(record_path)
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise PromcseError("not a promcse embedding cache record of this version", path=record_path)
    if record.get("parts") != parts:
        raise PromcseError("the record is for another model or corpus", path=record_path, key="parts")
    shape = record.get("shape")
    if not npy_path.is_file() or record.get("sha256") != sha256_file(npy_path):
        raise PromcseError("the vectors do not match their record's sha256", path=npy_path)
    vectors = load_array(npy_path)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or list(vectors.shape) != shape or shape[0] != rows \
            or not np.isfinite(vectors).all():
        raise PromcseError(f"expected finite float32 vectors of {rows} rows as recorded, got {vectors.shape}",
                           path=npy_path)
    return vectors


def read_entry(directory: str | Path, parts: dict[str, Any], rows: int) -> tuple[np.ndarray | None, str]:
    """(vectors, ``"hit"``), or (None, ``"miss"``) when absent, or (None, ``"corrupt"``) with a warning.

    Args:
        directory: The cache folder.
        parts: The entry's key parts (:func:`cache_parts`).
        rows: How many vectors the entry must hold.
    """
    root, key = Path(directory), cache_key(parts)
    if not os.path.lexists(root / f"{key}.json"):
        return None, "miss"
    try:
        return _check_entry(root, key, parts, rows), "hit"
    except PromcseError as err:
        warnings.warn(f"the cached corpus embeddings are damaged and are computed again: {err}", stacklevel=3)
        return None, "corrupt"


def write_entry(directory: str | Path, parts: dict[str, Any], vectors: np.ndarray) -> Path:
    """Store ``vectors`` under ``parts``' key: the ``.npy`` first, then its record (both atomic).

    Returns:
        The path of the ``.npy``.
    """
    root, key = Path(directory), cache_key(parts)
    npy_path = root / f"{key}.npy"
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would append ".npy" to the temporary name
            np.save(handle, vectors, allow_pickle=False)

    atomic_write(npy_path, save)
    record = {"format": FORMAT, "version": VERSION, "key": key, "parts": parts, "shape": list(vectors.shape),
              "dtype": "float32", "sha256": sha256_file(npy_path)}
    atomic_write_text(root / f"{key}.json", json.dumps(record, indent=2) + "\n")
    return npy_path


def cached_vectors(directory: str | Path | None, parts: dict[str, Any] | None, rows: int,
                   compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, str]:
    """The vectors of ``parts`` from the cache, or ``compute()`` stored there; and how they came.

    Args:
        directory: The cache folder, or None for no cache.
        parts: The key parts, or None for no cache (an encoder without a fingerprint).
        rows: How many vectors there must be.
        compute: Encodes the corpus: (rows, dim) unit-length vectors.

    Returns:
        (vectors, status): status is ``"hit"``, ``"miss"`` (computed and stored), ``"recomputed"`` (a damaged
        entry replaced) or ``"off"``.
    """
    if directory is None or parts is None:
        return compute(), "off"
    vectors, status = read_entry(directory, parts, rows)
    if vectors is not None:
        return vectors, status
    vectors = compute()
    try:
        write_entry(directory, parts, vectors)
    except OSError as err:  # a read-only or full cache costs time next run, never this result
        warnings.warn(f"could not store the corpus embeddings in {directory}: {err}", stacklevel=3)
    return vectors, "recomputed" if status == "corrupt" else "miss"
