"""Semantic search: an inner-product index over L2-normalised sentence embeddings.

Backends (all return cosine similarities, since vectors are normalised):

- ``flat``: FAISS ``IndexFlatIP``, exact.
- ``ivf``: FAISS ``IndexIVFFlat`` with ``METRIC_INNER_PRODUCT``, approximate; trained on the first
  batch of vectors added. ``auto`` picks it from :data:`AUTO_IVF_MIN` vectors on.
- ``numpy``: an exact matrix product, used when faiss is not importable (same results as ``flat``).

An index directory holds ``meta.json`` (format, backend, encoder reference), ``texts.jsonl`` (one JSON
object per line) and ``index.faiss`` or ``vectors.npy``. Nothing is pickled: FAISS's own binary format and
``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from promcse.errors import PromcseError

FORMAT = "promcse-index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TEXTS_FILE = "texts.jsonl"
FAISS_FILE = "index.faiss"
NUMPY_FILE = "vectors.npy"
KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "numpy")
AUTO_IVF_MIN = 100_000  # below this an exact flat scan is fast enough (< ~10 ms/query on one core at D=384)
IVF_POINTS_PER_LIST = 39  # FAISS warns when k-means gets fewer training points than 39 per centroid

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


def default_nlist(count: int) -> int:
    """IVF list count: ~4·sqrt(N), capped so each list gets at least 39 training points."""
    return max(1, min(int(4 * math.sqrt(count)), count // IVF_POINTS_PER_LIST))


class Index:
    """Inner-product index of texts embedded by one encoder.

    Args:
        encoder: The encoder (anything with ``encode(texts, batch_size=, normalize=, show_progress=)``), or a
            model reference to load with :func:`promcse.load`.
        model_ref: The reference saved in ``meta.json`` so :meth:`load` can find the encoder again (default:
            ``encoder`` when it is a string).
        kind: ``auto``, ``flat``, ``ivf`` or ``numpy`` (see the module docstring).
        nlist: IVF lists (default :func:`default_nlist` of the first batch).
        nprobe: IVF lists probed per query.
        batch_size: Texts per encoder forward pass.
        device: Device for a model loaded from a reference.
    """

    def __init__(self, encoder: Any, *, model_ref: str | None = None, kind: str = "auto", nlist: int | None = None,
                 nprobe: int = 16, batch_size: int = 64, device: str = "auto") -> None:
        if kind not in KINDS:
            raise PromcseError(f"unknown index kind '{kind}'; choose one of {', '.join(KINDS)}")
        if isinstance(encoder, (str, Path)):
            from promcse.loading import load

            model_ref = model_ref or str(encoder)
            encoder = load(str(encoder), device=device)
        self.encoder = encoder
        self.model_ref = _portable_ref(model_ref)
        self.kind = kind
        self.nlist = nlist
        self.nprobe = nprobe
        self.batch_size = batch_size
        self.texts: list[str] = []
        self._faiss = import_faiss()
        self._index: Any = None  # faiss index once the backend is fixed
        self._vectors: np.ndarray | None = None  # numpy backend

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def backend(self) -> str | None:
        """The resolved backend (``flat``, ``ivf`` or ``numpy``); None before the first :meth:`add`."""
        return None if self.kind == "auto" else self.kind

    @property
    def dim(self) -> int | None:
        """Vector size, once known."""
        if self._vectors is not None:
            return int(self._vectors.shape[1])
        return None if self._index is None else int(self._index.d)

    def add(self, texts: list[str], show_progress: bool = False) -> None:
        """Embed and add texts; ids continue from the current size.

        Raises:
            PromcseError: If ``texts`` is a bare string or IVF has too few vectors to train.
        """
        if isinstance(texts, str):
            raise PromcseError("Index.add expects a list of texts, not a single string")
        if not texts:
            return
        vectors = self._embed(list(texts), show_progress)
        self.add_vectors(list(texts), vectors)

    def add_vectors(self, texts: list[str], vectors: np.ndarray) -> None:
        """Add precomputed, L2-normalised (N, D) float vectors with their texts."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise PromcseError(f"expected ({len(texts)}, D) vectors, got shape {vectors.shape}")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise PromcseError(f"vectors have dimension {vectors.shape[1]}, the index has {self.dim}")
        if self.kind == "auto" or (self.kind != "numpy" and self._faiss is None):
            self.kind = self._resolve_kind(len(texts))
        if self.kind == "numpy":
            self._vectors = vectors if self._vectors is None else np.concatenate([self._vectors, vectors])
        else:
            if self._index is None:
                self._index = self._new_faiss(vectors)
            self._index.add(vectors)
        self.texts.extend(texts)

    def _resolve_kind(self, count: int) -> str:
        """Pick the backend: numpy without faiss; IVF for large first batches under ``auto``."""
        if self._faiss is None:
            if self.kind == "ivf":
                log.warning("faiss is not installed: using the exact numpy index instead of IVF")
            return "numpy"
        if self.kind == "auto":
            return "ivf" if count >= AUTO_IVF_MIN else "flat"
        return self.kind

    def _new_faiss(self, train: np.ndarray) -> Any:
        """A flat index, or an IVF index trained on ``train``."""
        faiss, dim = self._faiss, train.shape[1]
        if self.kind == "flat":
            return faiss.IndexFlatIP(dim)
        nlist = self.nlist or default_nlist(len(train))
        if len(train) < nlist:
            raise PromcseError(f"IVF with {nlist} lists needs at least {nlist} vectors in the first batch, "
                               f"got {len(train)}; use --kind flat or a smaller nlist")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.nprobe = min(self.nprobe, nlist)
        self.nlist = nlist
        return index

    def _embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Normalised float32 embeddings."""
        vectors = self.encoder.encode(texts, batch_size=self.batch_size, normalize=True, show_progress=show_progress)
        return np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))

    def search(self, queries: list[str] | str, top_k: int = 10, threshold: float | None = None) -> list[list[Hit]]:
        """The ``top_k`` most similar indexed texts per query, best first, at or above ``threshold``.

        Args:
            queries: Query texts (a single string is treated as one query).
            top_k: Results per query (at most the index size).
            threshold: Minimum cosine similarity to report.

        Returns:
            One list of :class:`Hit` per query.
        """
        if isinstance(queries, str):
            queries = [queries]
        if top_k < 1:
            raise PromcseError(f"top_k must be at least 1, got {top_k}")
        if not queries:
            return []
        return self.search_vectors(self._embed(list(queries)), top_k, threshold)

    def search_vectors(self, queries: np.ndarray, top_k: int = 10, threshold: float | None = None) -> list[list[Hit]]:
        """Like :meth:`search` for precomputed normalised (Q, D) query vectors."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(top_k, len(self.texts))
        if k == 0:
            return [[] for _ in range(len(queries))]
        if self.kind == "numpy":
            scores, ids = _numpy_top_k(self._vectors, queries, k)  # type: ignore[arg-type]
        else:
            scores, ids = self._index.search(queries, k)
        return [
            [Hit(self.texts[i], float(s), int(i)) for s, i in zip(row_s, row_i)
             if i >= 0 and (threshold is None or s >= threshold)]
            for row_s, row_i in zip(scores, ids)
        ]

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` (created if needed); returns it."""
        from promcse.checkpoint import versions
        from promcse.files import atomic_write_text

        if self.kind == "auto":
            raise PromcseError("cannot save an empty index: add texts first")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind == "numpy":
            np.save(out / NUMPY_FILE, self._vectors, allow_pickle=False)
        else:
            self._faiss.write_index(self._index, str(out / FAISS_FILE))  # type: ignore[union-attr]
        lines = (json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(self.texts))
        atomic_write_text(out / TEXTS_FILE, "".join(line + "\n" for line in lines))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": self.kind, "model": self.model_ref,
                "count": len(self.texts), "dim": self.dim, "normalized": True, "metric": "inner_product",
                "nlist": self.nlist, "nprobe": self.nprobe, "versions": versions()}
        atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path, encoder: Any = None, device: str = "auto") -> "Index":
        """Read an index directory; the encoder is loaded from the saved reference unless given.

        Raises:
            PromcseError: Missing or malformed files, a FAISS index without faiss installed, or no encoder.
        """
        root = Path(directory)
        meta = read_meta(root)
        if encoder is None:
            if not meta.get("model"):
                raise PromcseError("the index records no model reference: pass the encoder", path=root / META_FILE)
            from promcse.loading import load

            encoder = load(str(meta["model"]), device=device)
        index = cls(encoder, model_ref=meta.get("model"), kind=str(meta["backend"]),
                    nlist=meta.get("nlist"), nprobe=int(meta.get("nprobe") or 16))
        index.texts = read_texts(root / TEXTS_FILE)
        if meta["backend"] == "numpy":
            index._vectors = _load_npy(root / NUMPY_FILE)
        else:
            if index._faiss is None:
                raise PromcseError("this index was built with FAISS: pip install faiss-cpu to load it", path=root)
            index._index = index._faiss.read_index(str(root / FAISS_FILE))
            if meta["backend"] == "ivf":
                index._index.nprobe = index.nprobe
        stored = len(index._vectors) if index._vectors is not None else int(index._index.ntotal)
        if stored != len(index.texts):
            raise PromcseError(f"index holds {stored} vectors but {len(index.texts)} texts", path=root)
        return index


def _portable_ref(model_ref: str | None) -> str | None:
    """Existing local paths are stored absolute; names (``minilm``, hub names) as given."""
    if model_ref is None:
        return None
    path = Path(model_ref)
    return str(path.resolve()) if path.exists() else model_ref


def _numpy_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, best first (ties by lower id, like FAISS's flat index)."""
    scores = queries @ vectors.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
        np.arange(scores.shape[1]), (len(queries), 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, ids, axis=1), ids


def read_meta(root: Path) -> dict[str, Any]:
    """Read and check ``meta.json``."""
    path = root / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromcseError("not a promcse index directory (no meta.json)", path=root) from None
    except (OSError, ValueError) as err:
        raise PromcseError(f"cannot read index metadata: {err}", path=path) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PromcseError("not a promcse index (wrong format field)", path=path)
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise PromcseError("index written by a newer promcse; upgrade to load it", path=path)
    if meta.get("backend") not in ("flat", "ivf", "numpy"):
        raise PromcseError(f"unknown index backend {meta.get('backend')!r}", path=path)
    return meta


def read_texts(path: Path) -> list[str]:
    """Texts from ``texts.jsonl`` in id order."""
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise PromcseError(f"cannot read texts: {err.strerror}", path=path) from None
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            text, rid = record["text"], record["id"]
        except (ValueError, KeyError, TypeError):
            raise PromcseError("malformed line: expected {\"id\": int, \"text\": str}", path=path, line=number) from None
        if rid != len(texts) or not isinstance(text, str):
            raise PromcseError(f"expected id {len(texts)} with a string text", path=path, line=number)
        texts.append(text)
    return texts


def _load_npy(path: Path) -> np.ndarray:
    """Load the numpy backend's vectors without unpickling."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PromcseError(f"cannot read vectors: {err}", path=path) from None
    if vectors.ndim != 2:
        raise PromcseError(f"vectors must be 2-D, got shape {vectors.shape}", path=path)
    return np.ascontiguousarray(vectors, dtype=np.float32)
