"""The FAISS index kinds behind :class:`promcse.corpus.search.Index`, and exact rescoring from stored vectors.

All kinds score by inner product over L2-normalised vectors (cosine similarity):

========  ==========================================  ====================  =====================================
kind      FAISS index                                 bytes per vector      scores
========  ==========================================  ====================  =====================================
flat      ``IndexFlatIP``                             4·D                   exact
ivf       ``IndexIVFFlat`` (``nlist``, ``nprobe``)    4·D + 8               exact, over the probed lists
ivfpq     ``IndexIVFPQ`` (``pq_m`` x ``pq_bits``)     pq_m·pq_bits/8 + 8    approximate, then rescored
hnsw      ``IndexHNSWFlat`` (``hnsw_m``, ef_search)   4·D + ~8·hnsw_m       exact, over the visited graph
int8      ``IndexScalarQuantizer`` (8 bits per dim)   D                     approximate (rescore optional)
binary    ``IndexBinaryFlat`` over the sign bits      D/8                   1 - 2·hamming/D, then rescored
========  ==========================================  ====================  =====================================

The compressed kinds (``ivfpq``, ``int8``, ``binary``) keep a *store* of the full vectors for rescoring:
the ``rescore`` best candidates by code are scored exactly from the store, and the best ``top_k`` of them
returned. The store is the encode's shard directory (memory-mapped, never loaded whole) for an index
built ``--from-vectors``, or ``store.npy`` in the index directory for one built from texts.

The index directory's file names, the names it may hold (:func:`index_file`) and the check of the checksum
manifest in ``meta.json`` (:func:`verify_files`) live here too, with the readers of its files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promcse.io.jsonl import iter_jsonl
from promcse.errors import PromcseError
from promcse.io.schema import load_array
from promcse.io.files import atomic_write, verify_manifest
from promcse.corpus.shards import MANIFEST, dequantize, read_vectors, require_complete, sha256_file

META_FILE = "meta.json"
TEXTS_FILE = "texts.jsonl"
FAISS_FILE = "index.faiss"
NUMPY_FILE = "vectors.npy"
# From this meta.json format_version on, "files" lists the size and sha256 of every other file of the index,
# checked on load; older directories have no such list and load as before.
CHECKSUMS_FROM = 3
COMPRESSED: tuple[str, ...] = ("ivfpq", "int8", "binary")
NEEDS_TRAINING: tuple[str, ...] = ("ivf", "ivfpq", "int8")
DEFAULT_RESCORE: dict[str, int] = {"ivfpq": 100, "binary": 100}  # candidates rescored exactly; 0 elsewhere
IVF_POINTS_PER_LIST = 39  # FAISS warns when k-means gets fewer training points than 39 per centroid


@dataclass
class KindParams:
    """Construction and search settings of the FAISS kinds (those that do not apply are ignored).

    Attributes:
        nlist: IVF lists (default: :func:`default_nlist` of the training set).
        nprobe: IVF lists probed per query.
        pq_m: Product-quantiser sub-vectors, a divisor of D (default: :func:`default_pq_m`).
        pq_bits: Bits per sub-vector code (default: 8, fewer when the training set is small).
        hnsw_m: HNSW links per node.
        ef_construction: HNSW candidate list while building.
        ef_search: HNSW candidate list while searching.
    """

    nlist: int | None = None
    nprobe: int = 16
    pq_m: int | None = None
    pq_bits: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64


def default_nlist(count: int) -> int:
    """IVF list count: ~4·sqrt(N), capped so each list gets at least 39 training points."""
    return max(1, min(int(4 * math.sqrt(count)), count // IVF_POINTS_PER_LIST))


def default_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` up to ``dim / 8`` (8 dimensions per code: 48 for D=384).

    4 dimensions per code (96 at D=384) trains ~13x slower in FAISS 1.15 (60 s vs 4.5 s for 20k vectors on one
    core) for a few points of recall that rescoring recovers anyway.
    """
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def default_pq_bits(count: int) -> int:
    """8 bits per code when there are 39 training points per centroid (9,984), else fewer (at least 4)."""
    return max(4, min(8, int(math.log2(max(count, 1) / IVF_POINTS_PER_LIST)) if count else 4))


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    """Sign bits packed 8 to a byte: (N, ceil(D/8)) uint8."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def _ivf(faiss: Any, kind: str, dim: int, params: KindParams, train: np.ndarray) -> Any:
    nlist = params.nlist or default_nlist(len(train))
    if len(train) < nlist:
        raise PromcseError(f"IVF with {nlist} lists needs at least {nlist} training vectors, got {len(train)}; "
                           "use kind 'flat' or a smaller nlist", key="nlist")
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m, bits = params.pq_m or default_pq_m(dim), params.pq_bits or default_pq_bits(len(train))
        if dim % m or len(train) < 2 ** bits:
            raise PromcseError(f"product quantiser: pq_m={m} must divide D={dim} and the training set "
                               f"({len(train)}) must hold at least 2^{bits} vectors")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        params.pq_m, params.pq_bits = m, bits
    index.train(train)
    index.nprobe = min(params.nprobe, nlist)
    params.nlist = nlist
    return index


def new_index(faiss: Any, kind: str, dim: int, params: KindParams, train: np.ndarray) -> Any:
    """An empty FAISS index of ``kind``, trained on ``train`` where the kind needs it (fills in ``params``)."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind in ("ivf", "ivfpq"):
        return _ivf(faiss, kind, dim, params, train)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = params.ef_construction, params.ef_search
        return index
    if kind == "int8":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        return index
    if kind == "binary":
        return faiss.IndexBinaryFlat(8 * math.ceil(dim / 8))
    raise PromcseError(f"unknown FAISS index kind '{kind}'")


def add(index: Any, kind: str, vectors: np.ndarray) -> None:
    """Add float32 vectors (binary: their sign codes)."""
    index.add(binary_codes(vectors) if kind == "binary" else vectors)


def search(faiss: Any, index: Any, kind: str, queries: np.ndarray, k: int, dim: int, nprobe: int | None = None,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query; ``nprobe``/``ef_search`` override the index's for this call only.

    The HNSW candidate list is at least ``k`` and at most the index size (a longer one finds nothing more, but
    FAISS would allocate it for every query).
    """
    if kind == "binary":
        distances, ids = index.search(binary_codes(queries), k)
        return 1.0 - 2.0 * distances.astype(np.float32) / dim, ids
    if kind in ("ivf", "ivfpq") and nprobe is not None:
        return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=min(nprobe, index.nlist)))
    if kind == "hnsw":
        ef = min(max(index.hnsw.efSearch if ef_search is None else ef_search, k), max(k, int(index.ntotal)))
        return index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=ef))
    return index.search(queries, k)


def write_index(faiss: Any, index: Any, kind: str, path: Path) -> None:
    """FAISS's own binary format (``write_index_binary`` for binary codes)."""
    (faiss.write_index_binary if kind == "binary" else faiss.write_index)(index, str(path))


def read_index(faiss: Any, kind: str, path: Path) -> Any:
    """Inverse of :func:`write_index` (check it against ``meta.json``, then :func:`configure` it)."""
    try:
        return (faiss.read_index_binary if kind == "binary" else faiss.read_index)(str(path))
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PromcseError(f"cannot read the FAISS index (of kind '{kind}', as meta.json says): {first}",
                           path=path) from None


def configure(index: Any, kind: str, params: KindParams) -> None:
    """Apply the saved search settings to a FAISS index of ``kind`` read by :func:`read_index`."""
    if kind in ("ivf", "ivfpq"):
        index.nprobe = min(params.nprobe, index.nlist)
    if kind == "hnsw":
        index.hnsw.efSearch = params.ef_search


class MemoryStore:
    """Full vectors of an index built in memory (saved as ``store.npy``, loaded memory-mapped)."""

    FILE = "store.npy"

    def __init__(self, vectors: np.ndarray | None = None) -> None:
        self._parts: list[np.ndarray] = [] if vectors is None else [vectors]

    def append(self, vectors: np.ndarray) -> None:
        self._parts.append(np.asarray(vectors, dtype=np.float32))

    def _all(self) -> np.ndarray:
        if len(self._parts) > 1:
            self._parts = [np.concatenate(self._parts)]
        return self._parts[0]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Float32 vectors of the given row ids."""
        return np.asarray(self._all()[ids], dtype=np.float32)

    def describe(self, directory: Path) -> dict[str, Any]:
        """Write ``store.npy`` into the index directory; the meta entry that finds it again."""
        vectors = self._all() if self._parts else np.zeros((0, 0), np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, vectors, allow_pickle=False)

        atomic_write(directory / self.FILE, write)
        return {"kind": "local", "file": self.FILE}


class ShardStore:
    """The vectors of an encode's shard directory, memory-mapped shard by shard on first use."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.manifest = require_complete(self.root)
        self.starts = np.array([e["start"] for e in self.manifest["shards"]], dtype=np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def append(self, vectors: np.ndarray) -> None:
        """Nothing to do: the vectors are already in the shard files."""

    def _shard(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        if number not in self._maps:
            entry = self.manifest["shards"][number]
            files, shape = entry["files"], (entry["rows"], self.manifest["dim"])
            codes = load_array(self.root / files["vectors"]["name"], mmap=True)
            scales = load_array(self.root / files["scales"]["name"]) if "scales" in files else None
            if codes.shape != shape or (scales is not None and scales.shape != shape[:1]):
                raise PromcseError(f"expected {shape[0]} x {shape[1]} vectors (and scales), got {codes.shape}: "
                                   "changed since the index was built; rebuild it",
                                   path=self.root / files["vectors"]["name"])
            self._maps[number] = (codes, scales)
        return self._maps[number]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Float32 vectors of the given global row ids (int8 rescaled)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), int(self.manifest["dim"])), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for number in np.unique(shard_of):
            mask = shard_of == number
            codes, scales = self._shard(int(number))
            local = ids[mask] - self.starts[number]
            out[mask] = dequantize(codes[local], None if scales is None else scales[local])
        return out

    def describe(self, directory: Path) -> dict[str, Any]:
        """The meta entry: where the shards are, and the manifest checksum to notice if they change."""
        return {"kind": "shards", "path": str(self.root), "manifest_sha256": sha256_file(self.root / MANIFEST)}


def rescore(store: MemoryStore | ShardStore, queries: np.ndarray, candidates: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate ids (-1: none); the best ``k``, best first."""
    valid = candidates >= 0
    vectors = store.rows(np.where(valid, candidates, 0).ravel()).reshape(*candidates.shape, -1)
    scores = np.einsum("qrd,qd->qr", vectors, queries.astype(np.float32))
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    ids = np.where(np.isfinite(best), np.take_along_axis(candidates, order, axis=1), -1)
    return best, ids


def numpy_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, best first (ties by lower id, like FAISS's flat index)."""
    scores = queries @ vectors.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
        np.arange(scores.shape[1]), (len(queries), 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, ids, axis=1), ids


def read_records(path: Path) -> tuple[list[str], list[Any] | None]:
    """Texts from ``texts.jsonl`` in id order, and the corpus ids (``key``) when recorded."""
    texts: list[str] = []
    keys: list[Any] = []
    keyed = False
    for number, record in iter_jsonl(path):
        text, rid = record.get("text"), record.get("id")
        if rid != len(texts) or isinstance(rid, bool) or not isinstance(text, str):
            raise PromcseError(f'expected {{"id": {len(texts)}, "text": str}}', path=path, line=number)
        texts.append(text)
        keys.append(record.get("key", rid))
        keyed = keyed or "key" in record
    return texts, (keys if keyed else None)


def load_npy(path: Path) -> np.ndarray:
    """Load the numpy backend's vectors without unpickling."""
    vectors = load_array(path)
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise PromcseError(f"vectors must be a 2-D float array, got {vectors.dtype} {vectors.shape}", path=path)
    if not np.isfinite(vectors).all():
        raise PromcseError("vectors hold NaN or infinite values; rebuild the index", path=path)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def training_sample(root: str | Path, manifest: dict[str, Any], size: int, seed: int = 0) -> np.ndarray:
    """``size`` vectors drawn uniformly without replacement across the shards, read one shard at a time."""
    total = int(manifest["total_rows"])
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=min(size, total), replace=False))
    parts = []
    for entry in manifest["shards"]:
        start, stop = entry["start"], entry["start"] + entry["rows"]
        local = picked[(picked >= start) & (picked < stop)] - start
        if len(local):
            vectors = read_vectors(root, entry)
            parts.append(vectors[local])
            del vectors
    return np.concatenate(parts)


def index_file(name: str) -> bool:
    """Names an index directory may hold (so saving over it replaces nothing else)."""
    return name in (META_FILE, TEXTS_FILE, FAISS_FILE, NUMPY_FILE, MemoryStore.FILE) or (
        name.startswith(".") and name.endswith(".tmp"))


def verify_files(root: Path, meta: dict[str, Any]) -> None:
    """Check every file a save listed in ``meta.json`` (format 3 on): present, same size, same sha256.

    Raises:
        PromcseError: Naming the file that is missing, truncated or changed.
    """
    if int(meta.get("format_version", 0)) < CHECKSUMS_FROM:
        return
    store = meta.get("store")
    required = [TEXTS_FILE, NUMPY_FILE if meta["backend"] == "numpy" else FAISS_FILE]
    if isinstance(store, dict) and store.get("kind") == "local":
        required.append(str(store.get("file")))
    verify_manifest(root, meta.get("files"), required, root / META_FILE)
