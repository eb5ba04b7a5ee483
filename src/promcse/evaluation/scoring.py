"""What every evaluation shares: the encode-function type, one encoding of the distinct texts, Spearman.

Below :mod:`promcse.evaluation.sts` and :mod:`promcse.evaluation.cxc`, which both score cosines of a
:class:`Lookup` against gold scores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from promcse.encoder.encode import unit_rows
from promcse.errors import PromcseError

EncodeFn = Callable[[list[str]], np.ndarray]  # texts -> (len(texts), dim), e.g. SentenceTransformer.encode


class Lookup:
    """Unit embeddings of distinct texts, by text: one ``encode_fn`` call (or chunks of ``batch_texts``).

    Calling it maps texts to their rows; shared by STS and CxC."""

    def __init__(self, encode_fn: EncodeFn, texts: list[str], batch_texts: int | None = None) -> None:
        self.unique = list(dict.fromkeys(texts))
        self.index = {t: i for i, t in enumerate(self.unique)}
        step = batch_texts or max(len(self.unique), 1)
        chunks = [np.asarray(encode_fn(self.unique[i : i + step])) for i in range(0, len(self.unique), step)]
        emb = np.concatenate(chunks)
        if emb.ndim != 2 or emb.shape[0] != len(self.unique) or not np.all(np.isfinite(emb)):
            raise PromcseError(f"encoder returned {emb.shape} for {len(self.unique)} texts; want (n, dim), finite")
        self.emb = unit_rows(emb)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.emb[np.fromiter((self.index[t] for t in texts), dtype=np.int64, count=len(texts))]

    def cosines(self, s1: list[str], s2: list[str]) -> np.ndarray:
        return np.sum(self(s1) * self(s2), axis=1)


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman correlation ×100 (NaN, with scipy's warning, when either side is constant)."""
    return float(stats.spearmanr(pred, gold).statistic * 100.0)
