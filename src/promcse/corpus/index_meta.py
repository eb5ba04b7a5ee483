"""Strict reading of an index directory's ``meta.json``, and the checks that what it sits with agrees with it.

:func:`read_meta` checks every field before anything is loaded: exact types and ranges of the settings
(:data:`SETTINGS`), the keys each backend needs (:data:`NEEDS`), the ``store`` entry of the compressed kinds,
no unknown keys. :func:`check_faiss` then checks the FAISS index read from ``index.faiss`` against it (its
class and metric, dimension, size and build settings), so an ``index.faiss`` of another kind or size is refused
instead of answering wrongly, and :func:`open_store` opens the vectors a compressed kind rescores from. The same
ranges apply to :class:`~promcse.corpus.search.Index`'s settings and to each search's (:func:`check_setting`).
Every error is a :class:`~promcse.errors.PromcseError` naming ``meta.json`` (or the argument) and the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from promcse.errors import PromcseError
from promcse.io.schema import load_array
from promcse.corpus import index_kinds
from promcse.corpus.index_kinds import (COMPRESSED, FAISS_FILE, META_FILE, NUMPY_FILE, KindParams, MemoryStore,
                                        ShardStore, load_npy)
from promcse.io.schema import read_versioned
from promcse.io.json_fields import (MAX_DIM, MAX_INT, MAX_ROWS, checked, only, sha256_hex,
                                        shown)
from promcse.corpus.shards import MANIFEST, finite_matrix, sha256_file

FORMAT = "promcse-index"
FORMAT_VERSION = 3  # 1: flat, ivf, numpy; 2: the other kinds; 3: every kind, with checksums (index_kinds)
BACKENDS: tuple[str, ...] = ("flat", "ivf", "ivfpq", "hnsw", "int8", "binary", "numpy")
# Each numeric setting's range: (lowest, highest, may be null).
SETTINGS: dict[str, tuple[int, int, bool]] = {
    "nlist": (1, MAX_ROWS, True), "nprobe": (1, MAX_INT, False), "pq_m": (1, MAX_DIM, True),
    "pq_bits": (1, 16, True), "hnsw_m": (2, 4096, False), "ef_construction": (1, MAX_INT, False),
    "ef_search": (1, MAX_INT, False), "rescore": (0, MAX_INT, True)}
# The keys each backend's meta must hold (with a value, not null).
NEEDS: dict[str, tuple[str, ...]] = {
    "ivf": ("nlist", "nprobe"), "ivfpq": ("nlist", "nprobe", "pq_m", "pq_bits", "store"),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"), "int8": ("store",), "binary": ("store",)}
KEYS = ("format", "format_version", "backend", "model", "count", "dim", "normalized", "metric", "versions",
        "files", "store", *SETTINGS)
FAISS_CLASSES: dict[str, str] = {"flat": "IndexFlat", "ivf": "IndexIVFFlat", "ivfpq": "IndexIVFPQ",
                                 "hnsw": "IndexHNSWFlat", "int8": "IndexScalarQuantizer", "binary": "IndexBinaryFlat"}


def check_setting(name: str, value: Any, path: str | Path | None = None) -> Any:
    """A setting (:data:`SETTINGS`) of exactly type int within its range (None where it may be null).

    Raises:
        PromcseError: Keyed by ``name`` (and naming ``path``, for a setting read from a file).
    """
    lo, hi, null = SETTINGS[name]
    if value is None and null:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise PromcseError(f"expected int{' or null' if null else ''}, got {value!r:.60}", path=path, key=name)
    if not lo <= value <= hi:
        raise PromcseError(f"{value} is outside {lo}..{hi}", path=path, key=name)
    return int(value)


def check_top_k(top_k: Any, least: int = 0) -> int:
    """``top_k`` of a search: an int of at least ``least``."""
    if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)) or top_k < least:
        raise PromcseError(f"must be an integer of at least {least}, got {top_k!r:.40}", key="top_k")
    return int(top_k)


def check_search(queries: Any, dim: int | None, top_k: Any, threshold: Any, **settings: Any) -> np.ndarray:
    """The queries of a search as a finite (Q, ``dim``) float32 matrix, once every argument is checked.

    Raises:
        PromcseError: Keyed by the argument (``queries``, ``top_k``, ``threshold``, ``nprobe``, ...).
    """
    check_top_k(top_k)
    if threshold is not None and (isinstance(threshold, (bool, np.bool_)) or not isinstance(
            threshold, (int, float, np.integer, np.floating)) or not math.isfinite(threshold)):
        raise PromcseError(f"must be a finite number, got {threshold!r:.40}", key="threshold")
    for name, value in settings.items():
        if value is not None:
            check_setting(name, value)
    matrix = finite_matrix(queries, "queries")
    if dim is not None and matrix.shape[1] != dim:
        raise PromcseError(f"queries have dimension {matrix.shape[1]}, the index has {dim}", key="queries")
    return matrix


def read_meta(root: Path) -> dict[str, Any]:
    """Read ``meta.json`` and check every field (see the module docstring); formats 1 to 3.

    Raises:
        PromcseError: Naming ``meta.json`` and the key at fault.
    """
    path = root / META_FILE
    meta = read_versioned(path, FORMAT, FORMAT_VERSION, "index directory")
    only(meta, KEYS, path)
    backend = checked(meta, "backend", str, path, choices=BACKENDS)
    checked(meta, "model", str, path, null=True, default=None)
    checked(meta, "count", int, path, lo=0, hi=MAX_ROWS)
    checked(meta, "dim", int, path, lo=1, hi=MAX_DIM)
    checked(meta, "normalized", bool, path, choices=(True,), default=True)
    checked(meta, "metric", str, path, choices=("inner_product",), default="inner_product")
    versions = checked(meta, "versions", dict, path, default={})
    for name in versions:
        checked(versions, name, str, path, where="versions")
    for name in NEEDS.get(backend, ()):
        if meta.get(name) is None:
            raise PromcseError(f"missing: backend '{backend}' needs it", path=path, key=name)
    for name in SETTINGS:
        if name in meta:
            check_setting(name, meta[name], path)
    _check_store(meta, backend, path)
    return meta


def _check_store(meta: dict[str, Any], backend: str, path: Path) -> None:
    """``store``: null for the exact kinds; for the compressed ones ``store.npy`` or an absolute shard directory."""
    store = checked(meta, "store", dict, path, null=True, default=None)
    if store is None:
        return
    if backend not in COMPRESSED:
        raise PromcseError(f"backend '{backend}' rescores from nothing; expected null", path=path, key="store")
    kind = checked(store, "kind", str, path, where="store", choices=("local", "shards"))
    if kind == "local":
        only(store, ("kind", "file"), path, "store")
        checked(store, "file", str, path, where="store", choices=(MemoryStore.FILE,))
        return
    only(store, ("kind", "path", "manifest_sha256"), path, "store")
    if not Path(checked(store, "path", str, path, where="store")).is_absolute():
        raise PromcseError(f"expected an absolute path, got {shown(store['path'])}", path=path, key="store.path")
    sha256_hex(checked(store, "manifest_sha256", str, path, where="store"), path, "store.manifest_sha256")


def _faiss_facts(faiss: Any, index: Any, backend: str) -> dict[str, Any]:
    """What the loaded FAISS index says of the settings that ``meta.json`` records."""
    facts: dict[str, Any] = {"count": int(index.ntotal)}
    if backend in ("ivf", "ivfpq"):
        facts["nlist"] = int(index.nlist)
    if backend == "ivfpq":
        facts.update(pq_m=int(index.pq.M), pq_bits=int(index.pq.nbits))
    if backend == "hnsw":
        facts["hnsw_m"] = int(index.hnsw.nb_neighbors(1))
    return facts


def check_faiss(faiss: Any, index: Any, meta: dict[str, Any], path: Path) -> None:
    """The FAISS index read from ``index.faiss`` is of the kind, metric, size and settings ``meta.json`` says.

    Raises:
        PromcseError: Naming ``meta.json`` (``path``) and the key that disagrees.
    """
    backend = meta["backend"]
    expected = getattr(faiss, FAISS_CLASSES[backend])
    if not isinstance(index, expected) or (backend == "int8" and index.sq.qtype != faiss.ScalarQuantizer.QT_8bit):
        raise PromcseError(f"index.faiss holds a FAISS {type(index).__name__}, not the {FAISS_CLASSES[backend]} "
                           f"of backend '{backend}'", path=path, key="backend")
    if backend != "binary" and index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise PromcseError("index.faiss does not score by inner product", path=path, key="metric")
    dim = meta["dim"]
    if int(index.d) != (8 * math.ceil(dim / 8) if backend == "binary" else dim):
        raise PromcseError(f"index.faiss holds vectors of dimension {index.d}, not {dim}", path=path, key="dim")
    for key, value in _faiss_facts(faiss, index, backend).items():
        if meta.get(key) != value:
            raise PromcseError(f"index.faiss has {key} {value}, meta.json says {shown(meta.get(key))}", path=path,
                               key=key)


def open_store(meta: dict[str, Any], root: Path) -> MemoryStore | ShardStore:
    """The store a (checked) meta names: ``store.npy`` memory-mapped, or the shard directory, of the index's
    ``count`` x ``dim`` vectors.

    Raises:
        PromcseError: A store that is missing, of another shape, or whose shards changed since the build.
    """
    store, path, shape = meta["store"], root / META_FILE, (meta["count"], meta["dim"])
    if store["kind"] == "local":
        vectors = load_array(root / store["file"], mmap=True)
        if vectors.shape != shape or vectors.dtype.kind != "f":
            raise PromcseError(f"expected {shape[0]} x {shape[1]} float vectors, got {vectors.dtype} "
                               f"{vectors.shape}", path=root / store["file"])
        return MemoryStore(vectors)
    shards = Path(store["path"])
    if not (shards / MANIFEST).is_file():
        raise PromcseError(f"the shard directory this index rescores from is gone: {shards} (moved or deleted?); "
                           "put it back, or rebuild the index", path=path, key="store.path")
    if sha256_file(shards / MANIFEST) != store["manifest_sha256"]:
        raise PromcseError("the vectors this index rescores from changed since it was built: rebuild it",
                           path=shards)
    opened = ShardStore(shards)
    if (opened.manifest["total_rows"], opened.manifest["dim"]) != shape:
        raise PromcseError(f"holds {opened.manifest['total_rows']} x {opened.manifest['dim']} vectors, the "
                           f"index {shape[0]} x {shape[1]}", path=shards / MANIFEST)
    return opened


def read_numpy(meta: dict[str, Any], root: Path) -> np.ndarray:
    """``vectors.npy`` of a numpy-backend index: finite floats of the shape ``meta.json`` records."""
    vectors = load_npy(root / NUMPY_FILE)
    if vectors.shape != (meta["count"], meta["dim"]):
        raise PromcseError(f"{NUMPY_FILE} holds {vectors.shape[0]} x {vectors.shape[1]} vectors, meta.json says "
                           f"{meta['count']} x {meta['dim']}", path=root / META_FILE, key="dim")
    return vectors


def read_faiss(faiss: Any, meta: dict[str, Any], root: Path,
               params: KindParams) -> tuple[Any, MemoryStore | ShardStore | None]:
    """``index.faiss`` checked against ``meta.json`` (:func:`check_faiss`) with its search settings applied, and
    the store it rescores from (None for the exact kinds)."""
    index = index_kinds.read_index(faiss, meta["backend"], root / FAISS_FILE)
    check_faiss(faiss, index, meta, root / META_FILE)
    index_kinds.configure(index, meta["backend"], params)
    return index, (open_store(meta, root) if meta.get("store") else None)
