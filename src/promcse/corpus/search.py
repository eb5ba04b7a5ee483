"""Semantic search: an inner-product index over L2-normalised sentence embeddings.

Kinds (all return cosine similarities, since vectors are normalised; the FAISS ones are described in
:mod:`promcse.corpus.index_kinds`):

- ``flat``: FAISS ``IndexFlatIP``, exact.
- ``ivf``: FAISS ``IndexIVFFlat``, approximate (``nprobe`` lists per query). ``auto`` picks it from
  :data:`AUTO_IVF_MIN` vectors on.
- ``ivfpq``, ``hnsw``, ``int8``, ``binary``: product-quantised IVF, an HNSW graph, 8-bit scalar codes and
  sign-bit codes; the compressed ones (``ivfpq``, ``int8``, ``binary``) rescore their ``rescore`` best
  candidates exactly from the stored vectors.
- ``numpy``: an exact matrix product, used when faiss is not importable (same results as ``flat``).

Kinds that need training (``ivf``, ``ivfpq``, ``int8``) are trained by :meth:`Index.train`, or on the
first batch added. :func:`build_from_vectors` builds from an encode's shard directory one shard at a time,
training on a sample, so the compressed kinds never hold all vectors in memory.

An index directory holds ``meta.json`` (format, backend, settings, encoder reference, and the size and
sha256 of every other file, checked on load), ``texts.jsonl`` (one JSON object per line) and ``index.faiss``
or ``vectors.npy`` (plus ``store.npy`` for a compressed index built from texts). It is written as a whole
(temporary directory, fsync, rename), so re-saving over an index never leaves a half-written one. Nothing
is pickled: FAISS's own binary format and ``numpy.load(allow_pickle=False)``. Loading checks every field of
``meta.json`` and the FAISS index against it (:mod:`promcse.corpus.index_meta`); NaN or infinite vectors, and
search arguments out of range, are refused.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from promcse.corpus import index_kinds, index_meta, shards
from promcse.errors import PromcseError
from promcse.corpus.index_kinds import (COMPRESSED, DEFAULT_RESCORE, FAISS_FILE, IVF_POINTS_PER_LIST,  # noqa: F401
                                 META_FILE, NEEDS_TRAINING, NUMPY_FILE, TEXTS_FILE, KindParams, MemoryStore,
                                 ShardStore, default_nlist, index_file, load_npy, numpy_top_k, read_records,
                                 training_sample, verify_files)
from promcse.corpus.index_meta import BACKENDS, FORMAT, FORMAT_VERSION, check_setting  # noqa: F401

KINDS: tuple[str, ...] = ("auto", *BACKENDS)
AUTO_IVF_MIN = 100_000  # below this an exact flat scan is fast enough (< ~10 ms/query on one core at D=384)
DEFAULT_TRAIN_SIZE = 100_000  # vectors sampled to train IVF/PQ/int8 when building from shards

log = logging.getLogger(__name__)


class Hit(NamedTuple):
    """One search result: the indexed text, its cosine similarity to the query, and its id (insertion order)."""

    text: str
    score: float
    id: int


def import_faiss() -> ModuleType | None:
    """The faiss module, or None when it is not installed (the exact numpy path is used then)."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


class Index:
    """Inner-product index of texts embedded by one encoder.

    Args:
        encoder: The encoder (anything with ``encode(texts, batch_size=, normalize=, show_progress=)``), or a
            model reference to load with :func:`promcse.load` (None: vectors only, see :meth:`add_vectors`).
        model_ref: The reference saved in ``meta.json`` so :meth:`load` can find the encoder again (default:
            ``encoder`` when it is a string).
        kind: One of :data:`KINDS` (see the module docstring).
        nlist, nprobe, pq_m, pq_bits, hnsw_m, ef_search: FAISS settings (:class:`~promcse.corpus.index_kinds.KindParams`).
        rescore: Candidates rescored exactly per query for the compressed kinds (default:
            :data:`~promcse.corpus.index_kinds.DEFAULT_RESCORE`; 0: the codes' own scores).
        batch_size: Texts per encoder forward pass.
        device: Device for a model loaded from a reference.
    """

    def __init__(self, encoder: Any, *, model_ref: str | None = None, kind: str = "auto", nlist: int | None = None,
                 nprobe: int = 16, batch_size: int = 64, device: str = "auto", pq_m: int | None = None,
                 pq_bits: int | None = None, hnsw_m: int = 32, ef_search: int = 64, rescore: int | None = None) -> None:
        if kind not in KINDS:
            raise PromcseError(f"unknown index kind '{kind}'; choose one of {', '.join(KINDS)}")
        if isinstance(encoder, (str, Path)):
            from promcse.models.loading import load

            model_ref = model_ref or str(encoder)
            encoder = load(str(encoder), device=device)
        self.encoder = encoder
        self.model_ref = _portable_ref(model_ref)
        self.kind = kind
        self.params = KindParams(nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_bits=pq_bits, hnsw_m=hnsw_m,
                                 ef_search=ef_search)
        for name, value in vars(self.params).items():
            check_setting(name, value)
        self.rescore = check_setting("rescore", rescore)
        self.batch_size = batch_size
        self.texts: list[str] = []
        self.keys: list[Any] | None = None  # the corpus ids of an index built from shards
        self._faiss = import_faiss()
        self._index: Any = None  # faiss index once the backend is fixed
        self._vectors: np.ndarray | None = None  # numpy backend
        self._store: MemoryStore | ShardStore | None = None  # full vectors, for rescoring compressed kinds
        self._dim: int | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def nlist(self) -> int | None:
        """IVF lists (resolved once trained)."""
        return self.params.nlist

    @property
    def nprobe(self) -> int:
        """IVF lists probed per query by default."""
        return self.params.nprobe

    @property
    def backend(self) -> str | None:
        """The resolved backend; None before the first :meth:`add`."""
        return None if self.kind == "auto" else self.kind

    @property
    def dim(self) -> int | None:
        """Vector size, once known."""
        return int(self._vectors.shape[1]) if self._vectors is not None else self._dim

    def add(self, texts: list[str], show_progress: bool = False) -> None:
        """Embed and add texts; ids continue from the current size.

        Raises:
            PromcseError: If ``texts`` is a bare string or a trained kind has too few vectors to train.
        """
        if isinstance(texts, str):
            raise PromcseError("Index.add expects a list of texts, not a single string")
        if not texts:
            return
        vectors = self._embed(list(texts), show_progress)
        self.add_vectors(list(texts), vectors)

    def resolve_kind(self, count: int) -> str:
        """Fix the backend: numpy without faiss; under ``auto``, IVF from :data:`AUTO_IVF_MIN` vectors on."""
        if self._faiss is None:
            if self.kind not in ("auto", "flat", "numpy"):
                log.warning("faiss is not installed: using the exact numpy index instead of %s", self.kind)
            self.kind = "numpy"
        elif self.kind == "auto":
            self.kind = "ivf" if count >= AUTO_IVF_MIN else "flat"
        return self.kind

    def train(self, sample: np.ndarray, count: int | None = None) -> None:
        """Create the FAISS index, trained on ``sample`` where the kind needs it (``count``: the expected size,
        for ``auto``). Called on the first :meth:`add_vectors` when not called before."""
        sample = shards.finite_matrix(sample)
        if self.resolve_kind(count or len(sample)) == "numpy" or self._index is not None:
            return
        self._dim = int(sample.shape[1])
        self._index = index_kinds.new_index(self._faiss, self.kind, self._dim, self.params, sample)
        if self.kind in COMPRESSED and self._store is None:
            self._store = MemoryStore()

    def add_vectors(self, texts: list[str], vectors: np.ndarray, keys: list[Any] | None = None) -> None:
        """Add precomputed, L2-normalised (N, D) float vectors with their texts (and corpus ids).

        Raises:
            PromcseError: Vectors of another shape or dimension, or NaN/infinite values (the row named).
        """
        vectors = shards.finite_matrix(vectors)
        if vectors.shape[0] != len(texts):
            raise PromcseError(f"expected ({len(texts)}, D) vectors, got shape {vectors.shape}")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise PromcseError(f"vectors have dimension {vectors.shape[1]}, the index has {self.dim}")
        if self._index is None and self.kind != "numpy":
            self.train(vectors)
        if self.kind == "numpy":
            self._vectors = vectors if self._vectors is None else np.concatenate([self._vectors, vectors])
        else:
            index_kinds.add(self._index, self.kind, vectors)
            if self._store is not None:
                self._store.append(vectors)
        if keys is not None:
            self.keys = (self.keys or list(range(len(self.texts)))) + list(keys)
        elif self.keys is not None:
            self.keys.extend(range(len(self.texts), len(self.texts) + len(texts)))
        self.texts.extend(texts)

    def _embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Normalised float32 embeddings."""
        if self.encoder is None:
            raise PromcseError("this index has no encoder: load it with one, or search with vectors")
        vectors = self.encoder.encode(texts, batch_size=self.batch_size, normalize=True, show_progress=show_progress)
        matrix = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        bad = np.flatnonzero(~np.isfinite(matrix).reshape(len(matrix), -1).all(axis=1))
        if len(bad):
            raise PromcseError(f"the encoder gave NaN or infinite values for text {bad[0]} ({texts[bad[0]][:60]!r})")
        return matrix

    def search(self, queries: list[str] | str, top_k: int = 10, threshold: float | None = None,
               **settings: int | None) -> list[list[Hit]]:
        """The ``top_k`` most similar indexed texts per query, best first, at or above ``threshold``.

        Args:
            queries: Query texts (a single string is treated as one query).
            top_k: Results per query (at most the index size).
            threshold: Minimum cosine similarity to report.
            settings: ``nprobe``, ``ef_search`` or ``rescore`` for this call (see :meth:`search_vectors`).

        Returns:
            One list of :class:`Hit` per query.
        """
        if isinstance(queries, str):
            queries = [queries]
        index_meta.check_top_k(top_k, least=1)
        if not queries:
            return []
        return self.search_vectors(self._embed(list(queries)), top_k, threshold, **settings)

    def search_vectors(self, queries: np.ndarray, top_k: int = 10, threshold: float | None = None, *,
                       nprobe: int | None = None, ef_search: int | None = None,
                       rescore: int | None = None) -> list[list[Hit]]:
        """Like :meth:`search` for precomputed normalised (Q, D) query vectors.

        Args:
            top_k: Results per query (0: none).
            nprobe: IVF lists to probe (``ivf``, ``ivfpq``; default: the index's).
            ef_search: HNSW candidate list (default: the index's).
            rescore: Candidates to rescore exactly (compressed kinds; 0: none; default: the index's).

        Raises:
            PromcseError: An argument of the wrong type or out of range
                (:data:`~promcse.corpus.index_meta.SETTINGS`), or queries that are not a finite (Q, D) matrix.
        """
        queries = index_meta.check_search(queries, self.dim if len(self.texts) else None, top_k, threshold,
                                          nprobe=nprobe, ef_search=ef_search, rescore=rescore)
        k = min(top_k, len(self.texts))
        if k == 0:
            return [[] for _ in range(len(queries))]
        wanted = self.default_rescore() if rescore is None else rescore
        if self.kind == "numpy":
            scores, ids = numpy_top_k(self._vectors, queries, k)  # type: ignore[arg-type]
        elif self._store is not None and wanted > 0:
            fetch = min(max(wanted, k), len(self.texts))
            _, candidates = index_kinds.search(self._faiss, self._index, self.kind, queries, fetch, self.dim,
                                               nprobe=nprobe, ef_search=ef_search)
            scores, ids = index_kinds.rescore(self._store, queries, candidates, k)
        else:
            scores, ids = index_kinds.search(self._faiss, self._index, self.kind, queries, k, self.dim,
                                             nprobe=nprobe, ef_search=ef_search)
        return [
            [Hit(self.texts[i], float(s), int(i)) for s, i in zip(row_s, row_i)
             if i >= 0 and (threshold is None or s >= threshold)]
            for row_s, row_i in zip(scores, ids)
        ]

    def default_rescore(self) -> int:
        """Candidates rescored per query when a search does not say."""
        return DEFAULT_RESCORE.get(self.kind, 0) if self.rescore is None else self.rescore

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` as a whole and return it (see :func:`promcse.io.files.atomic_directory`).

        The directory is created (parents too) or replaced: an index already there stays loadable until the
        new one is complete. A directory holding anything but index files is refused, as is one holding the
        shard directory this index rescores from.
        """
        from promcse.io.files import atomic_directory, check_output_dir

        if self.kind == "auto" or (self._index is None and self._vectors is None):
            raise PromcseError("cannot save an empty index: add texts first")
        sources = [self._store.root] if isinstance(self._store, ShardStore) else []
        out = check_output_dir(directory, ours=index_file, inputs=sources, replaced=True, what="promcse index",
                               label="directory")
        return atomic_directory(out, self._write)

    def _write(self, out: Path) -> None:
        """Every file of the index into the (temporary) directory ``out``; ``meta.json`` last, listing the
        size and sha256 of each of the others."""
        from promcse.models.checkpoint import versions
        from promcse.io.files import file_manifest

        if self.kind == "numpy":
            np.save(out / NUMPY_FILE, self._vectors, allow_pickle=False)
        else:
            index_kinds.write_index(self._faiss, self._index, self.kind, out / FAISS_FILE)
        keys = self.keys
        lines = (json.dumps({"id": i, "text": t} if keys is None else {"id": i, "text": t, "key": keys[i]},
                            ensure_ascii=False) for i, t in enumerate(self.texts))
        (out / TEXTS_FILE).write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
        store = None if self._store is None else self._store.describe(out)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": self.kind, "model": self.model_ref,
                "count": len(self.texts), "dim": self.dim, "normalized": True, "metric": "inner_product",
                **asdict(self.params), "rescore": self.rescore, "store": store, "versions": versions(),
                "files": file_manifest(out, sorted(p.name for p in out.iterdir()))}
        (out / META_FILE).write_bytes(json.dumps(meta, indent=2).encode("utf-8"))

    @classmethod
    def load(cls, directory: str | Path, encoder: Any = None, device: str = "auto") -> "Index":
        """Read an index directory; the encoder is loaded from the saved reference unless given.

        Raises:
            PromcseError: Missing or malformed files, a FAISS index without faiss installed, or no encoder.
        """
        root = Path(directory)
        meta = read_meta(root)
        verify_files(root, meta)
        if encoder is None:
            if not meta.get("model"):
                raise PromcseError("the index records no model reference: pass the encoder", path=root / META_FILE)
            from promcse.models.loading import load

            encoder = load(str(meta["model"]), device=device)
        settings = {k: meta[k] for k in ("nlist", "nprobe", "pq_m", "pq_bits", "hnsw_m", "ef_search", "rescore")
                    if k in meta}
        index = cls(encoder, model_ref=meta.get("model"), kind=meta["backend"], **settings)
        index.texts, index.keys = read_records(root / TEXTS_FILE)
        if len(index.texts) != meta["count"]:
            raise PromcseError(f"{TEXTS_FILE} holds {len(index.texts)} texts, meta.json says {meta['count']}",
                               path=root / META_FILE, key="count")
        index._read_vectors(root, meta)
        return index

    def _read_vectors(self, root: Path, meta: dict[str, Any]) -> None:
        """The vectors of a loaded index (``vectors.npy``, or ``index.faiss`` and its store), checked against the
        (checked) ``meta``."""
        if meta["backend"] == "numpy":
            self._vectors = index_meta.read_numpy(meta, root)
            return
        if self._faiss is None:
            raise PromcseError("this index was built with FAISS: pip install faiss-cpu to load it", path=root)
        self._index, self._store = index_meta.read_faiss(self._faiss, meta, root, self.params)
        self._dim = meta["dim"]

def build_from_vectors(root: str | Path, *, kind: str = "auto", model_ref: str | None = None,
                       train_size: int = DEFAULT_TRAIN_SIZE, seed: int = 0, show_progress: bool = False,
                       **settings: Any) -> Index:
    """An index over an encode's shard directory (``promcse encode --output DIR``), added shard by shard.

    Kinds that need training are trained on ``train_size`` vectors sampled across the shards; each shard is
    then loaded, added and dropped before the next, and the compressed kinds rescore from the shard files
    (memory-mapped), so they never hold more than one shard of float vectors plus the sample.

    Args:
        root: The shard directory (a finished, whole encode).
        kind: One of :data:`KINDS`.
        model_ref: The encoder reference to record (default: the manifest's).
        train_size: Training sample size (at most the corpus).
        seed: Seed of the sample.
        show_progress: Show a tqdm bar over the shards.
        settings: :class:`Index` keyword settings (``nlist``, ``nprobe``, ``pq_m``, ``rescore``, ...).
    """
    manifest = shards.require_complete(root)
    index = Index(None, model_ref=model_ref or manifest["model"], kind=kind, **settings)
    for entry in manifest["shards"]:  # every file as the encode wrote it, before any is read
        shards.check_shard(root, entry)
    if index.resolve_kind(int(manifest["total_rows"])) in NEEDS_TRAINING:
        index.train(training_sample(root, manifest, train_size, seed))
    if index.kind in COMPRESSED:
        index._store = ShardStore(root)
    for entry in tqdm(manifest["shards"], desc="index", unit="shard", disable=not show_progress):
        vectors = shards.read_vectors(root, entry)
        rows = shards.read_rows(root, entry)
        index.add_vectors([str(r.get("text", r["id"])) for r in rows], vectors, keys=[r["id"] for r in rows])
        del vectors, rows  # one shard at a time
    return index


def _portable_ref(model_ref: str | None) -> str | None:
    """Existing local paths are stored absolute; names (``minilm``, hub names) as given."""
    if model_ref is None:
        return None
    path = Path(model_ref)
    return str(path.resolve()) if path.exists() else model_ref


def read_meta(root: Path) -> dict[str, Any]:
    """Read ``meta.json``, every field checked (:func:`promcse.corpus.index_meta.read_meta`)."""
    return index_meta.read_meta(root)


def read_texts(path: Path) -> list[str]:
    """Texts from ``texts.jsonl`` in id order."""
    return read_records(path)[0]
