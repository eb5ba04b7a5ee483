"""Hard-negative mining (``promcse mine``): for each training pair, corpus sentences close to the anchor that
are not its positive, found with the :class:`~promcse.corpus.search.Index`.

The semantics follow sentence-transformers' ``util.mine_hard_negatives``:

- The corpus (by default every distinct sentence of the input: ``sent0``, ``sent1`` and ``hard_neg``) is
  embedded once with the model and put in an :class:`~promcse.corpus.search.Index` (exact ``flat`` below 100,000
  sentences under ``index_kind="auto"``, IVF above; the exact numpy scan when faiss is not installed).
  Duplicate corpus texts are kept once.
- The candidates of an anchor are its corpus neighbours by cosine similarity, best first, **without the
  anchor itself and without every positive of that anchor** (an anchor repeated on several rows with
  different positives excludes all of them on each of its rows). Ranks count from 1 over what remains:
  ``range_min..range_max`` (inclusive) keeps ranks 10 to 50 by default, skipping the very top, which is
  often a paraphrase. (sentence-transformers' ``range_min=a-1, range_max=b`` is our ``a-b``.)
- False-negative filters against the row's positive score ``p = cos(anchor, positive)``: ``margin m`` drops
  candidates with ``score > p - m``; ``max_score r`` drops candidates with ``score > r * p``. At most one.
- ``per_anchor K`` negatives per row, the hardest passing ones (``top``) or ``K`` drawn at random
  (``random``, seeded; kept in rank order). A row with fewer than ``K`` passing candidates is dropped and
  counted.

**Unsupervised input** (a ``.txt`` file, one sentence a line): each sentence is its own positive
(``sent1 = sent0``, the dropout-view task), so its positive score is taken as exactly 1.0: ``margin m``
drops neighbours scoring above ``1 - m`` and ``max_score r`` those above ``r`` — an absolute cap that
removes near-duplicates of the sentence. The rank range applies as above (the sentence itself is skipped).

The result's columns are ``sent0,sent1,hard_neg``, or ``sent0,sent1,hard_neg_1..hard_neg_K`` for ``K > 1``;
:mod:`promcse.corpus.mine_files` reads ``--corpus`` files, writes the rows atomically (CSV or JSON Lines, the format
:func:`promcse.io.data.read_training_file` reads) and formats the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from promcse.io.data import HARD_NEG_COLUMN, PAIR_COLUMNS, TrainExamples
from promcse.errors import PromcseError
from promcse.corpus.search import KINDS, Index

STRATEGIES: tuple[str, ...] = ("top", "random")
SCORE_BUDGET = 50_000_000  # query x corpus scores per search call (the numpy fallback holds them all at once)
MAX_QUERY_CHUNK = 1024


class Encoder(Protocol):
    """What the miner needs from a model: :meth:`promcse.encoder.model.SentenceEncoder.encode`'s signature."""

    def encode(self, texts: list[str], batch_size: int = ..., normalize: bool = ..., **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class MineConfig:
    """How to mine (``promcse mine``'s options).

    Attributes:
        range_min: First neighbour rank kept (1-based, after the anchor and its positives are removed).
        range_max: Last neighbour rank kept (inclusive).
        margin: Drop candidates with ``score > positive_score - margin`` (None: off).
        max_score: Drop candidates with ``score > max_score * positive_score`` (None: off).
        per_anchor: Negatives per output row (``K``).
        strategy: ``top`` (the hardest passing candidates) or ``random`` (``K`` of them, seeded).
        seed: Seed of the ``random`` strategy.
        batch_size: Texts per forward pass when embedding the corpus.
        index_kind: The :class:`~promcse.corpus.search.Index` kind (``auto``: exact flat below 100,000 sentences).
        show_progress: Show tqdm bars (embedding, search).
    """

    range_min: int = 10
    range_max: int = 50
    margin: float | None = None
    max_score: float | None = None
    per_anchor: int = 1
    strategy: str = "top"
    seed: int = 0
    batch_size: int = 64
    index_kind: str = "auto"
    show_progress: bool = False

    def validate(self) -> None:
        """Check every field, naming it as :attr:`PromcseError.key` (the command line shows its option instead).

        Raises:
            PromcseError: An empty or reversed range, both filters, ``K`` above the range's size, etc.
        """
        if not 1 <= self.range_min <= self.range_max:
            raise PromcseError(f"ranks {self.range_min}-{self.range_max}: need 1 <= range_min <= range_max "
                               "(ranks count from 1), e.g. 10-50", key="range_min")
        if self.margin is not None and self.max_score is not None:
            raise PromcseError("margin and max_score are mutually exclusive: give one false-negative filter")
        for name, value in (("margin", self.margin), ("max_score", self.max_score)):
            if value is not None and not math.isfinite(value):
                raise PromcseError(f"must be a finite number, got {value}", key=name)
        width = self.range_max - self.range_min + 1
        if not 1 <= self.per_anchor <= width:
            raise PromcseError(f"{self.per_anchor} negatives per row, but ranks {self.range_min}-{self.range_max} "
                               f"hold only {width} candidate(s) per anchor; widen range_min..range_max or lower "
                               "per_anchor", key="per_anchor")
        if self.strategy not in STRATEGIES:
            raise PromcseError(f"'{self.strategy}': choose one of {', '.join(STRATEGIES)}", key="strategy")
        if self.batch_size < 1:
            raise PromcseError(f"must be at least 1, got {self.batch_size}", key="batch_size")
        if self.index_kind not in KINDS:
            raise PromcseError(f"'{self.index_kind}': choose one of {', '.join(KINDS)}", key="index_kind")

    def describe(self) -> str:
        """One line: range, filter, strategy and K."""
        rule = (f"margin {self.margin:g}" if self.margin is not None else
                f"max-score {self.max_score:g} x positive" if self.max_score is not None else "no filter")
        return f"ranks {self.range_min}-{self.range_max}, {rule}, {self.strategy}, {self.per_anchor} per row"


@dataclass
class MineStats:
    """What mining kept and dropped (counts over rows; candidates counted once per row).

    Attributes:
        rows_in: Input rows.
        rows_out: Rows written (each with ``K`` negatives).
        anchors: Distinct anchors searched.
        corpus: Distinct corpus sentences indexed.
        skipped: Neighbours skipped for being the anchor or one of its positives (per distinct anchor).
        in_range: Candidates inside the rank range, summed over rows.
        dropped_margin: Candidates dropped by ``margin``.
        dropped_max_score: Candidates dropped by ``max_score``.
        rows_short: Rows dropped because fewer than ``K`` candidates passed.
        positive_mean: Mean positive score of the rows written.
        negative_mean: Mean score of the chosen negatives.
    """

    rows_in: int = 0
    rows_out: int = 0
    anchors: int = 0
    corpus: int = 0
    skipped: int = 0
    in_range: int = 0
    dropped_margin: int = 0
    dropped_max_score: int = 0
    rows_short: int = 0
    positive_mean: float = math.nan
    negative_mean: float = math.nan


@dataclass(frozen=True)
class MinedResult:
    """Mined rows, aligned: ``anchor[i]``, ``positive[i]`` and its ``K`` negatives ``negatives[i]`` (best first).

    Attributes:
        anchor, positive: The kept rows' texts (unsupervised input: ``positive == anchor``).
        negatives: ``K`` negative texts per row.
        positive_scores: ``cos(anchor, positive)`` per row (1.0 for unsupervised input).
        negative_scores: ``cos(anchor, negative)`` per row and negative.
        stats: The counts for the report.
        config: The options used.
        unsupervised: True when the input had no positives (a ``.txt`` file).
        source: The input file, for messages.
    """

    anchor: list[str]
    positive: list[str]
    negatives: list[list[str]]
    positive_scores: list[float]
    negative_scores: list[list[float]]
    stats: MineStats
    config: MineConfig
    unsupervised: bool = False
    source: str = field(default="")

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def columns(self) -> list[str]:
        """``sent0, sent1, hard_neg`` for ``K = 1``, else ``sent0, sent1, hard_neg_1 .. hard_neg_K``."""
        k = self.config.per_anchor
        return [*PAIR_COLUMNS, *([HARD_NEG_COLUMN] if k == 1 else [f"{HARD_NEG_COLUMN}_{i}" for i in range(1, k + 1)])]

    def records(self) -> list[list[str]]:
        """The output rows, in :attr:`columns` order."""
        return [[a, p, *n] for a, p, n in zip(self.anchor, self.positive, self.negatives)]

    def to_csv(self) -> str:
        """Quoted CSV with a header row, ``\\n`` line ends."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(self.columns)
        writer.writerows(self.records())
        return buffer.getvalue()

    def to_jsonl(self) -> str:
        """One JSON object per row, keyed by :attr:`columns`."""
        return "".join(json.dumps(dict(zip(self.columns, r)), ensure_ascii=False) + "\n" for r in self.records())


def default_corpus(pairs: TrainExamples) -> list[str]:
    """Every distinct sentence of the pairs (anchors, positives, hard negatives), in first-seen order."""
    return list(dict.fromkeys([*pairs.anchor, *(pairs.positive or []), *(pairs.negative or [])]))


def _embed(model: Encoder, corpus: list[str], extra: list[str],
           config: MineConfig) -> tuple[np.ndarray, dict[str, int]]:
    """Unit float32 vectors of the corpus then of the ``extra`` texts not in it, and each text's row."""
    ids = {text: i for i, text in enumerate(corpus)}
    for text in extra:
        ids.setdefault(text, len(ids))
    texts = list(ids)
    vectors = np.asarray(model.encode(texts, batch_size=config.batch_size, normalize=True,
                                      show_progress=config.show_progress), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise PromcseError(f"the model returned shape {vectors.shape} for {len(texts)} texts")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32), ids


def _choose(ids: np.ndarray, scores: np.ndarray, positive: float, config: MineConfig,
            rng: np.random.Generator, stats: MineStats) -> np.ndarray | None:
    """Positions (into ``ids``) of the row's ``K`` negatives after the filter, or None when too few pass."""
    stats.in_range += len(ids)
    keep = np.ones(len(ids), dtype=bool)
    if config.margin is not None:
        keep = scores <= positive - config.margin
        stats.dropped_margin += int((~keep).sum())
    elif config.max_score is not None:
        keep = scores <= config.max_score * positive
        stats.dropped_max_score += int((~keep).sum())
    passing = np.flatnonzero(keep)
    if len(passing) < config.per_anchor:
        stats.rows_short += 1
        return None
    if config.strategy == "top":
        return passing[: config.per_anchor]
    return np.sort(rng.choice(passing, size=config.per_anchor, replace=False))


def _groups(anchors: list[str]) -> dict[str, list[int]]:
    """Rows of each distinct anchor, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for row, anchor in enumerate(anchors):
        groups.setdefault(anchor, []).append(row)
    return groups


def _ranked(hits: list[Any], skip: set[int], config: MineConfig, stats: MineStats) -> tuple[np.ndarray, np.ndarray]:
    """The neighbours at ranks ``range_min..range_max`` once the anchor and its positives are removed."""
    kept = [(h.id, h.score) for h in hits if h.id not in skip]
    stats.skipped += len(hits) - len(kept)
    window = kept[config.range_min - 1: config.range_max]
    return np.array([i for i, _ in window], dtype=np.int64), np.array([s for _, s in window], dtype=np.float64)


def _search_all(index: Index, vectors: np.ndarray, ids: dict[str, int], groups: dict[str, list[int]],
                positives: list[str], config: MineConfig, stats: MineStats,
                positive_scores: np.ndarray) -> list[np.ndarray | None]:
    """Search every distinct anchor in chunks and choose each row's negatives (corpus ids; None: too few)."""
    chosen: list[np.ndarray | None] = [None] * len(positives)
    rng = np.random.default_rng(config.seed)
    names = list(groups)
    chunk = max(1, min(MAX_QUERY_CHUNK, SCORE_BUDGET // max(1, len(index))))
    for start in tqdm(range(0, len(names), chunk), desc="mine", unit="chunk", disable=not config.show_progress):
        block = names[start: start + chunk]
        skips = [{ids[a], *(ids[positives[r]] for r in groups[a])} for a in block]
        top_k = min(len(index), config.range_max + max(len(s) for s in skips))
        hits = index.search_vectors(vectors[[ids[a] for a in block]], top_k=top_k)
        for anchor, row_hits, skip in zip(block, hits, skips):
            cand_ids, cand_scores = _ranked(row_hits, skip, config, stats)
            for row in groups[anchor]:
                pick = _choose(cand_ids, cand_scores, float(positive_scores[row]), config, rng, stats)
                chosen[row] = None if pick is None else cand_ids[pick]
    return chosen


def _pair_rows(pairs: TrainExamples) -> tuple[list[str], list[str], bool]:
    """Anchors, positives (the anchors themselves for unsupervised input) and whether the input is unsupervised."""
    if isinstance(pairs, (str, Path)) or not hasattr(pairs, "anchor"):
        raise PromcseError("mine_hard_negatives expects TrainExamples (see promcse.io.data.read_training_file)")
    if len(pairs.anchor) == 0:
        raise PromcseError("no rows to mine for", path=pairs.source or None)
    if pairs.positive is None:
        return list(pairs.anchor), list(pairs.anchor), True
    return list(pairs.anchor), list(pairs.positive), False


def mine_hard_negatives(model: Encoder, pairs: TrainExamples, corpus: list[str] | None = None,
                        config: MineConfig | None = None) -> MinedResult:
    """Mine ``config.per_anchor`` hard negatives per row of ``pairs`` from ``corpus`` (see the module docstring).

    Args:
        model: Anything with ``encode(texts, batch_size=, normalize=, show_progress=)`` (e.g. ``promcse.load(ref)``).
        pairs: Rows from :func:`promcse.io.data.read_training_file` (``positive is None``: unsupervised).
        corpus: Candidate sentences (default: :func:`default_corpus` of ``pairs``); duplicates are kept once.
        config: The options (default: :class:`MineConfig()`).

    Returns:
        The kept rows with their negatives and scores, and the counts.

    Raises:
        PromcseError: Bad options, no rows, or an empty corpus.
    """
    config = config or MineConfig()
    config.validate()
    anchors, positives, unsupervised = _pair_rows(pairs)
    texts = list(dict.fromkeys(default_corpus(pairs) if corpus is None else corpus))
    if not texts:
        raise PromcseError("the corpus is empty: nothing to mine negatives from")
    vectors, ids = _embed(model, texts, [*anchors, *positives], config)
    index = Index(None, kind=config.index_kind)
    index.add_vectors(texts, vectors[: len(texts)])
    a_rows, p_rows = [ids[a] for a in anchors], [ids[p] for p in positives]
    positive_scores = (np.ones(len(anchors)) if unsupervised else
                       np.einsum("ij,ij->i", vectors[a_rows].astype(np.float64), vectors[p_rows].astype(np.float64)))
    groups = _groups(anchors)
    stats = MineStats(rows_in=len(anchors), anchors=len(groups), corpus=len(texts))
    chosen = _search_all(index, vectors, ids, groups, positives, config, stats, positive_scores)
    return _assemble(anchors, positives, texts, vectors, a_rows, positive_scores, chosen, stats, config,
                     unsupervised, pairs.source)


def _assemble(anchors: list[str], positives: list[str], texts: list[str], vectors: np.ndarray, a_rows: list[int],
              positive_scores: np.ndarray, chosen: list[np.ndarray | None], stats: MineStats, config: MineConfig,
              unsupervised: bool, source: str) -> MinedResult:
    """The kept rows in input order, with their scores (recomputed from the vectors) and the means."""
    kept = [r for r, c in enumerate(chosen) if c is not None]
    negatives = [[texts[i] for i in chosen[r]] for r in kept]  # type: ignore[union-attr]
    neg_scores = [[float(vectors[a_rows[r]].astype(np.float64) @ vectors[i].astype(np.float64))
                   for i in chosen[r]] for r in kept]  # type: ignore[union-attr]
    stats.rows_out = len(kept)
    if kept:
        stats.positive_mean = float(np.mean(positive_scores[kept]))
        stats.negative_mean = float(np.mean(neg_scores))
    return MinedResult([anchors[r] for r in kept], [positives[r] for r in kept], negatives,
                       [float(positive_scores[r]) for r in kept], neg_scores, stats, config, unsupervised, source)
