"""Losses of queries against a fixed corpus: every document of the corpus is a candidate, none is trained.

Query-side training (:mod:`promcse.training.query_side`) keeps the document vectors fixed (the frozen backbone's,
already in the user's index), so each query can be scored against the *whole* corpus at the cost of one
``(B, D) x (D, N)`` product: the corpus itself is the bank of negatives, and every hard negative a miner would
find is among them. Documents judged relevant to a query are never its negatives (the false-negative filter).

``sim`` is ``(B, N)``: cosine of query ``i`` with document ``j``; ``relevant`` is a ``(B, N)`` boolean mask of
each query's judged-relevant documents (at least one per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def query_corpus_similarity(queries: Tensor, documents: Tensor) -> Tensor:
    """``sim[i, j] = cos(q_i, d_j)`` for ``(B, D)`` queries and ``(N, D)`` documents (both normalised here)."""
    if queries.dim() != 2 or documents.dim() != 2 or queries.shape[1] != documents.shape[1]:
        raise ValueError(f"need queries (B, D) and documents (N, D), got {tuple(queries.shape)} and "
                         f"{tuple(documents.shape)}")
    return F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T


def _check(sim: Tensor, relevant: Tensor) -> None:
    if sim.dim() != 2 or relevant.shape != sim.shape or relevant.dtype != torch.bool:
        raise ValueError(f"need sim (B, N) and a boolean mask of the same shape, got {tuple(sim.shape)} and "
                         f"{tuple(relevant.shape)} {relevant.dtype}")
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant document")
    if bool(relevant.all(dim=1).any()):
        raise ValueError("a query with every document relevant has no negative")


def corpus_nt_xent(sim: Tensor, relevant: Tensor, temperature: float = 0.05) -> Tensor:
    """InfoNCE of each (query, relevant document) pair against every non-relevant document of the corpus.

    With ``s_ij = sim_ij / tau`` and ``R_i`` the documents relevant to query ``i``::

        L = (1/B) sum_i (1/|R_i|) sum_{p in R_i} -log( e^{s_ip} / (e^{s_ip} + sum_{j not in R_i} e^{s_ij}) )

    Each positive competes with the negatives alone, not with the query's other positives (which would push
    relevant documents apart); a query with one positive gets MNRL / NT-Xent with the corpus as its negatives.

    Args:
        sim: ``(B, N)`` cosines (:func:`query_corpus_similarity`).
        relevant: ``(B, N)`` boolean mask of judged-relevant documents.
        temperature: tau > 0.

    Returns:
        Scalar mean loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check(sim, relevant)
    logits = sim / temperature
    negatives = torch.logsumexp(logits.masked_fill(relevant, float("-inf")), dim=1, keepdim=True)
    per_pair = F.softplus(negatives - logits)  # log(e^s + e^neg) - s, without cancellation
    per_query = (per_pair * relevant).sum(dim=1) / relevant.sum(dim=1)
    return per_query.mean()


def corpus_hinge(sim: Tensor, relevant: Tensor, margin: float = 0.2) -> Tensor:
    """Energy-based hinge (PromCSE's EH) of each relevant pair against the query's hardest non-relevant document::

        L = (1/B) sum_i (1/|R_i|) sum_{p in R_i} max(0, m - sim_ip + max_{j not in R_i} sim_ij)

    Args:
        sim: ``(B, N)`` cosines (no temperature).
        relevant: ``(B, N)`` boolean mask of judged-relevant documents.
        margin: m.

    Returns:
        Scalar mean loss.
    """
    _check(sim, relevant)
    hardest = sim.masked_fill(relevant, float("-inf")).amax(dim=1, keepdim=True)
    per_pair = F.relu(margin - sim + hardest)
    per_query = (per_pair * relevant).sum(dim=1) / relevant.sum(dim=1)
    return per_query.mean()
