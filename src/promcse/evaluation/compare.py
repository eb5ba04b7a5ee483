"""Paired comparison of two retrieval evaluations, query by query.

Reads two result files of retrieval evaluation (the ``"retrieval"`` section that ``promcse eval`` writes: one
model per file) and, for every dataset present in both, compares the per-query values of each metric: the mean
difference B − A, a paired two-sided t-test (``scipy.stats.ttest_rel``), a paired bootstrap test and the
wins/ties/losses of B against A. The bootstrap resamples the queries with replacement
(:data:`BOOTSTRAP_RESAMPLES` times, ``numpy.random.default_rng(0)``) from the differences centred on zero (the
null hypothesis), and its p-value is ``(1 + #{|resampled mean| >= |observed mean|}) / (1 + resamples)``,
two-sided and never 0. Both files must hold the same query ids for a dataset: anything else is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from promcse.errors import PromcseError
from promcse.io.jsonl import parse_json
from promcse.io.schema import read_regular_file

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10",)
MAX_RESULT_BYTES = 1 << 30
_CHUNK = 500  # bootstrap resamples drawn at once (bounds memory for many queries)


def read_retrieval_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``"retrieval"`` section of a result file: ``{dataset: result with "per_query"}``.

    Raises:
        PromcseError: Not a JSON object, several models' results, or no retrieval results with per-query values.
    """
    raw = read_regular_file(path, MAX_RESULT_BYTES)
    try:
        data = parse_json(raw.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise PromcseError("not UTF-8 JSON", path=path) from None
    if isinstance(data, list):
        raise PromcseError(f"holds the results of {len(data)} models; compare needs a file of one model", path=path)
    if not isinstance(data, dict):
        raise PromcseError(f"expected a JSON object, got {type(data).__name__}", path=path)
    section = data.get("retrieval")
    if not isinstance(section, dict) or not section:
        raise PromcseError("holds no retrieval results", path=path, key="retrieval")
    for name, result in section.items():
        if not isinstance(result, dict) or not isinstance(result.get("per_query"), dict) or not result["per_query"]:
            raise PromcseError(f"dataset '{name}' has no per-query values", path=path, key=f"retrieval.{name}")
    return section


def _values(result: dict[str, Any], metric: str, path: str | Path, name: str, ids: list[str]) -> np.ndarray:
    """One metric of every query in ``ids`` order, checked to be finite numbers."""
    out = []
    for query in ids:
        value = result["per_query"][query].get(metric) if isinstance(result["per_query"][query], dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PromcseError(f"query '{query}' has no number for '{metric}'", path=path,
                               key=f"retrieval.{name}.per_query.{query}")
        out.append(float(value))
    return np.asarray(out, dtype=np.float64)


def paired_bootstrap(diffs: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided paired bootstrap p-value of a mean difference (see the module docstring)."""
    observed = abs(float(np.mean(diffs)))
    centred = diffs - np.mean(diffs)
    rng = np.random.default_rng(seed)
    extreme, done = 0, 0
    while done < resamples:
        size = min(_CHUNK, resamples - done)
        means = centred[rng.integers(0, len(diffs), size=(size, len(diffs)))].mean(axis=1)
        extreme += int(np.sum(np.abs(means) >= observed - 1e-12))
        done += size
    return (1 + extreme) / (1 + resamples)


def paired_t_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of ``scipy.stats.ttest_rel(b, a)``; 1.0 when every difference is 0."""
    diffs = b - a
    if np.all(diffs == diffs[0]):
        return 1.0 if diffs[0] == 0 else 0.0  # no variance: scipy would give NaN (or a warning)
    return float(stats.ttest_rel(b, a).pvalue)


def compare_metric(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """The paired statistics of one metric over the same queries (B against A)."""
    diffs = b - a
    return {"mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)), "diff": float(np.mean(diffs)),
            "t_pvalue": paired_t_test(a, b), "bootstrap_pvalue": paired_bootstrap(diffs, resamples, seed),
            "wins": int(np.sum(diffs > 0)), "ties": int(np.sum(diffs == 0)), "losses": int(np.sum(diffs < 0)),
            "n": len(diffs)}


def _same_queries(a: dict[str, Any], b: dict[str, Any], name: str, paths: tuple[Any, Any]) -> list[str]:
    ids_a, ids_b = set(a["per_query"]), set(b["per_query"])
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b)[:3], sorted(ids_b - ids_a)[:3]
        raise PromcseError(f"dataset '{name}' has different query ids in {paths[0]} and {paths[1]} (only in the "
                           f"first: {only_a or 'none'}; only in the second: {only_b or 'none'}): the two results "
                           "are not of the same queries", path=paths[1], key=f"retrieval.{name}")
    return sorted(ids_a)


def compare_results(path_a: str | Path, path_b: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Compare two result files dataset by dataset (see the module docstring).

    Returns:
        ``{"a", "b", "datasets": {name: {metric: {"mean_a", "mean_b", "diff", "t_pvalue", "bootstrap_pvalue",
        "wins", "ties", "losses", "n"}}}, "only_a", "only_b"}``; ``diff`` and ``wins`` are B against A.

    Raises:
        PromcseError: A file that is not one model's retrieval results, no dataset in common, different query ids,
            or a metric without per-query values.
    """
    a, b = read_retrieval_results(path_a), read_retrieval_results(path_b)
    common = [name for name in a if name in b]
    if not common:
        raise PromcseError(f"no dataset in common with {path_a} (it has {', '.join(a)}; this has {', '.join(b)})",
                           path=path_b)
    out: dict[str, Any] = {"a": str(path_a), "b": str(path_b), "datasets": {},
                           "only_a": [n for n in a if n not in b], "only_b": [n for n in b if n not in a]}
    for name in common:
        ids = _same_queries(a[name], b[name], name, (path_a, path_b))
        out["datasets"][name] = {m: compare_metric(_values(a[name], m, path_a, name, ids),
                                                   _values(b[name], m, path_b, name, ids), resamples, seed)
                                 for m in dict.fromkeys(metrics)}
    return out


def format_comparison(result: dict[str, Any]) -> str:
    """A fixed-width table of :func:`compare_results`: one row per dataset and metric."""
    rows = [(d, m, s) for d, by_metric in result["datasets"].items() for m, s in by_metric.items()]
    width = max([len("Dataset"), *(len(d) for d, _, _ in rows)])
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"{'Dataset':<{width}}  {'metric':<10}  {'A':>7}  {'B':>7}  {'B-A':>7}  {'p(t)':>7}  {'p(boot)':>7}"
             f"  {'W/T/L (B vs A)':>14}  {'n':>6}", "-" * (width + 88)]
    for name, metric, s in rows:
        wtl = f"{s['wins']}/{s['ties']}/{s['losses']}"
        lines.append(f"{name:<{width}}  {metric:<10}  {s['mean_a']:>7.2f}  {s['mean_b']:>7.2f}  {s['diff']:>+7.2f}  "
                     f"{s['t_pvalue']:>7.4f}  {s['bootstrap_pvalue']:>7.4f}  {wtl:>14}  {s['n']:>6}")
    for side in ("only_a", "only_b"):
        if result[side]:
            lines.append(f"only in {side[-1].upper()} (not compared): {', '.join(result[side])}")
    return "\n".join(lines)
