"""Retrieval evaluation on BEIR datasets, by the BEIR / MTEB protocol, for any pair of encode functions.

Documents (:mod:`promcse.evaluation.beir`: ``(title + " " + text).strip()``) and the queries that have judgements
are encoded and L2-normalised; every query is ranked against the whole corpus by exact cosine similarity (a
matrix product in blocks of queries, :data:`SCORE_BUDGET` scores at a time) and its best ``top_k`` (1000) are
kept. A document whose id equals the query's id is left out of that query's results (BEIR's
``ignore_identical_ids``); empty documents have no vector and are never retrieved. The run is scored by
trec_eval's definitions (``pytrec_eval``, :data:`METRICS`): nDCG@10 with graded gains, Recall@100, MAP@100, and
MRR@10 as ``recip_rank`` over the run cut at rank 10 (what MTEB computes), averaged over the judged queries
and ×100. Per-query values come with the means. The corpus vectors are cached
(:mod:`promcse.evaluation.embedding_cache`) when the document encoder has a fingerprint. See docs/EVALUATION.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from promcse.encoder.encode import unit_rows
from promcse.errors import PromcseError
from promcse.evaluation.beir import TEXT_RULE, BeirData, read_beir
from promcse.evaluation.embedding_cache import cache_parts, cached_vectors, default_cache_dir
from promcse.evaluation.fingerprint import document_fingerprint
from promcse.evaluation.scoring import EncodeFn
from promcse.models.roles import RoleEncoder

# Our metric name -> pytrec_eval's measure (the key it reports is the measure with "_" for ".").
METRICS: dict[str, str] = {"ndcg@10": "ndcg_cut.10", "mrr@10": "recip_rank", "recall@100": "recall.100",
                           "map@100": "map_cut.100"}
MRR_DEPTH = 10  # MRR@10: recip_rank over each query's first 10 results
DEFAULT_TOP_K = 1000
SCORE_BUDGET = 1 << 25  # query-document scores computed at once (128 MiB of float32)


def _vectors(encode_fn: EncodeFn, texts: list[str], what: str, dim: int | None = None) -> np.ndarray:
    """Unit-length float32 vectors of ``texts``, checked: one finite row per text (of ``dim`` values if given)."""
    out = np.asarray(encode_fn(texts))
    if out.ndim != 2 or out.shape[0] != len(texts) or not np.all(np.isfinite(out)):
        raise PromcseError(f"the {what} encoder returned {out.shape} for {len(texts)} texts; want (n, dim), finite")
    if dim is not None and out.shape[1] != dim:
        raise PromcseError(f"query vectors have {out.shape[1]} dimensions, documents {dim}; the encoders must agree")
    return unit_rows(out.astype(np.float32, copy=False)).astype(np.float32, copy=False)


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the columns of the ``k`` highest scores, best first (ties: lower column first), and the scores."""
    if k < scores.shape[1]:
        cols = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        cols = np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    picked = np.take_along_axis(scores, cols, axis=1)
    order = np.lexsort((cols, -picked), axis=1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(picked, order, axis=1)


def rank(queries: np.ndarray, documents: np.ndarray, top_k: int, exclude: np.ndarray | None = None,
         show_progress: bool = False) -> list[list[tuple[int, float]]]:
    """Exact inner-product ranking: each query's best ``top_k`` documents as (row, score), best first.

    Args:
        queries: (Q, D) unit vectors.
        documents: (N, D) unit vectors.
        top_k: Results per query (at most N).
        exclude: (Q,) a document row to leave out of each query's results, -1 for none.
        show_progress: A tqdm bar over the blocks of queries.
    """
    k = min(top_k, len(documents))
    rows = max(1, SCORE_BUDGET // max(len(documents), 1))
    out: list[list[tuple[int, float]]] = []
    starts = range(0, len(queries), rows)
    for start in tqdm(starts, disable=not show_progress or len(starts) < 2, desc="rank", unit="block"):
        scores = queries[start : start + rows] @ documents.T
        if exclude is not None:
            hit = np.flatnonzero(exclude[start : start + rows] >= 0)
            scores[hit, exclude[start + hit]] = -np.inf
        cols, best = _top_k(scores, k)
        out += [[(int(c), float(s)) for c, s in zip(r, v) if s != -np.inf] for r, v in zip(cols, best)]
    return out


def score_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per judged query, every metric of :data:`METRICS` ×100 (pytrec_eval; a query without results scores 0).

    ``run`` maps each query to its results (document id -> score) in rank order; MRR@10 reads the first 10.
    """
    import pytrec_eval

    full = pytrec_eval.RelevanceEvaluator(qrels, {m for m in METRICS.values() if m != "recip_rank"}).evaluate(run)
    cut = {q: dict(list(docs.items())[:MRR_DEPTH]) for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    out: dict[str, dict[str, float]] = {}
    for query in qrels:
        values = {**full.get(query, {}), **rr.get(query, {})}
        out[query] = {name: 100.0 * float(values.get(measure.replace(".", "_"), 0.0))
                      for name, measure in METRICS.items()}
    return out


def _retrievable(data: BeirData) -> list[int]:
    """The corpus positions of the documents with text; the empty ones are counted in one warning."""
    kept = [i for i, text in enumerate(data.doc_texts) if text]
    if not kept:
        raise PromcseError("no document has any text", path=data.folder / "corpus.jsonl")
    if len(kept) < len(data.doc_texts):
        warnings.warn(f"{len(data.doc_texts) - len(kept)} of {len(data.doc_texts)} documents of {data.folder} are "
                      "empty: they are never retrieved", stacklevel=3)
    return kept


def _identical_rows(data: BeirData, kept: list[int]) -> np.ndarray:
    """For each judged query, the vector row of the document with the same id, or -1."""
    row_of = {data.doc_ids[i]: row for row, i in enumerate(kept)}
    return np.asarray([row_of.get(q, -1) for q in data.query_ids], dtype=np.int64)


def _cache_dir(cache: bool | str | Path) -> Path | None:
    if cache is True:
        return default_cache_dir()
    return None if cache is False else Path(cache)


def _summary(data: BeirData, per_query: dict[str, dict[str, float]], top_k: int, cache: str,
             ignore_identical_ids: bool) -> dict[str, Any]:
    means = {name: float(np.mean([row[name] for row in per_query.values()])) for name in METRICS}
    return {"dataset": data.name, "split": data.split, "folder": str(data.folder), "metrics": means,
            "queries": len(per_query), "documents": len(data.doc_ids), "empty_documents": data.empty_documents,
            "top_k": top_k, "ignore_identical_ids": ignore_identical_ids, "cache": cache, "per_query": per_query}


def evaluate_retrieval(
    encode_queries: EncodeFn,
    encode_documents: EncodeFn,
    folder: str | Path | BeirData,
    split: str = "test",
    top_k: int = DEFAULT_TOP_K,
    *,
    cache: bool | str | Path = True,
    fingerprint: str | None = None,
    max_length: int | None = None,
    ignore_identical_ids: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a bi-encoder on one split of a BEIR dataset folder (see the module docstring).

    Args:
        encode_queries: Query texts -> (n, dim) vectors.
        encode_documents: Document texts -> (n, dim) vectors (may be the same function).
        folder: The dataset folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), or the
            dataset already read (:func:`promcse.evaluation.beir.read_beir`; ``split`` is then its own).
        split: The qrels split.
        top_k: Results kept per query (Recall@100 and MAP@100 need at least 100).
        cache: True: the default cache folder; a path: that folder; False: no cache.
        fingerprint: The document encoder's identity; without one the corpus vectors are not cached.
        max_length: The token limit documents are encoded with, as part of the cache key.
        ignore_identical_ids: Leave a document out of the results of the query with the same id (BEIR's default).
        show_progress: A tqdm bar while ranking.

    Returns:
        ``{"dataset", "split", "folder", "metrics": {"ndcg@10", "mrr@10", "recall@100", "map@100"}, "queries",
        "documents", "empty_documents", "top_k", "ignore_identical_ids", "cache", "per_query": {id: metrics}}``.

    Raises:
        PromcseError: A bad dataset file (naming file and line), a ``top_k`` below 1, or an encoder returning
            the wrong shape.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise PromcseError(f"must be a positive integer, got {top_k!r}", key="top_k")
    data = folder if isinstance(folder, BeirData) else read_beir(folder, split)
    corpus = corpus_vectors(data, encode_documents, cache=cache, fingerprint=fingerprint, max_length=max_length)
    query_vectors = _vectors(encode_queries, data.query_texts, "query", corpus.vectors.shape[1])
    return score_vectors(data, query_vectors, corpus, top_k, ignore_identical_ids, show_progress)


@dataclass(frozen=True)
class CorpusVectors:
    """The unit vectors of a corpus's documents that have text.

    Attributes:
        rows: Each vector's position in the corpus (``data.doc_ids``); empty documents have none.
        vectors: (len(rows), dim) float32 unit vectors.
        status: How they came from the embedding cache (``hit``, ``miss``, ``recomputed``, ``off``).
    """

    rows: list[int]
    vectors: np.ndarray
    status: str


def corpus_vectors(data: BeirData, encode_documents: EncodeFn, *, cache: bool | str | Path = True,
                   fingerprint: str | None = None, max_length: int | None = None) -> CorpusVectors:
    """The document vectors of ``data`` (from the cache when ``fingerprint`` names the encoder and it has them)."""
    kept = _retrievable(data)
    parts = cache_parts(fingerprint, data.corpus_sha256, TEXT_RULE, max_length) if fingerprint else None
    texts = [data.doc_texts[i] for i in kept]
    vectors, status = cached_vectors(_cache_dir(cache), parts, len(kept),
                                     lambda: _vectors(encode_documents, texts, "document"))
    return CorpusVectors(kept, vectors, status)


def score_vectors(data: BeirData, query_vectors: np.ndarray, corpus: CorpusVectors, top_k: int = DEFAULT_TOP_K,
                  ignore_identical_ids: bool = True, show_progress: bool = False) -> dict[str, Any]:
    """Rank the corpus for each judged query's (unit) vector and score the run (:func:`evaluate_retrieval`'s
    result)."""
    kept = corpus.rows
    exclude = _identical_rows(data, kept) if ignore_identical_ids else None
    ranked = rank(query_vectors, corpus.vectors, top_k, exclude, show_progress)
    run = {q: {data.doc_ids[kept[row]]: score for row, score in hits} for q, hits in zip(data.query_ids, ranked)}
    return _summary(data, score_run(data.qrels, run), top_k, corpus.status, ignore_identical_ids)


def encoder_corpus_vectors(encoder: Any, data: BeirData, max_length: int | None = None, *,
                           cache: bool | str | Path = True, batch_size: int = 64,
                           show_progress: bool = True) -> CorpusVectors:
    """:func:`corpus_vectors` of a promcse encoder, keyed in the cache exactly as :func:`evaluate_encoder` keys
    it (so an evaluation and a training run over the same documents share one entry)."""
    fingerprint = document_fingerprint(encoder, max_length) if cache is not False else None
    limit = min(max_length or encoder.max_length, encoder.max_length)
    encode = _encode_with(encoder, batch_size, show_progress, max_length)
    return corpus_vectors(data, encode, cache=cache, fingerprint=fingerprint, max_length=limit)


def _encode_with(model: Any, batch_size: int, show_progress: bool, max_length: int | None) -> EncodeFn:
    return lambda texts: model.encode(texts, batch_size=batch_size, show_progress=show_progress,
                                      max_length=max_length, normalize=True)


def evaluate_encoder(
    encoder: Any,
    folder: str | Path | BeirData,
    split: str = "test",
    top_k: int = DEFAULT_TOP_K,
    *,
    documents: Any | None = None,
    cache: bool | str | Path = True,
    fingerprint: str | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> dict[str, Any]:
    """:func:`evaluate_retrieval` with a promcse encoder (``promcse.load``'s torch or ONNX encoder).

    Args:
        encoder: Encodes the queries (and the documents unless ``documents`` is given). A
            :class:`promcse.models.roles.RoleEncoder` encodes queries with its query role and documents with its
            document role, whose fingerprint keys the cache: a query-only pair shares the frozen backbone's entry.
        documents: The document encoder, when it differs: e.g. the frozen backbone under a query-side-only
            prompt. The cache is keyed on it alone, so such a run reuses the frozen backbone's corpus vectors.
        fingerprint: The document encoder's identity (default:
            :func:`promcse.evaluation.fingerprint.document_fingerprint`).
        max_length: Token limit for queries and documents (default: the encoder's position limit). MTEB truncates
            all-MiniLM-L6-v2 at 256, its sentence-transformers ``max_seq_length``.
        batch_size: Texts per forward pass.
        folder, split, top_k, cache, show_progress: As for :func:`evaluate_retrieval`.
    """
    query_encoder, doc_encoder = encoder, documents if documents is not None else encoder
    if isinstance(encoder, RoleEncoder):  # distinct roles: queries and documents each through their own
        query_encoder, doc_encoder = encoder.query, documents if documents is not None else encoder.document

    def encode_with(model: Any) -> EncodeFn:
        return _encode_with(model, batch_size, show_progress, max_length)

    if fingerprint is None and cache is not False:
        fingerprint = document_fingerprint(doc_encoder, max_length)
    limit = min(max_length or doc_encoder.max_length, doc_encoder.max_length)
    return evaluate_retrieval(encode_with(query_encoder), encode_with(doc_encoder), folder, split, top_k,
                              cache=cache, fingerprint=fingerprint, max_length=limit, show_progress=show_progress)


def format_retrieval_table(results: dict[str, dict[str, Any]], model_name: str) -> str:
    """A fixed-width table of retrieval results (``{dataset key: evaluate_retrieval result}``), ×100."""
    width = max([len("Dataset"), *map(len, results)])
    lines = [f"Model: {model_name}  (retrieval; x100)",
             f"{'Dataset':<{width}}  {'nDCG@10':>7}  {'MRR@10':>7}  {'R@100':>7}  {'MAP@100':>7}  {'queries':>7}"
             f"  {'empty docs':>10}  cache",
             "-" * (width + 70)]
    for name, row in results.items():
        m = row["metrics"]
        lines.append(f"{name:<{width}}  {m['ndcg@10']:>7.2f}  {m['mrr@10']:>7.2f}  {m['recall@100']:>7.2f}  "
                     f"{m['map@100']:>7.2f}  {row['queries']:>7}  {row['empty_documents']:>10}  {row['cache']}")
    return "\n".join(lines)
