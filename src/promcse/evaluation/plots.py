"""Figures of STS evaluation results (:func:`promcse.evaluation.sts.evaluate` dicts).

The text table is :func:`promcse.evaluation.sts.format_table` (also importable from here). matplotlib is optional
(``pip install matplotlib``) and imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from promcse.errors import PromcseError
from promcse.evaluation.sts import STANDARD_TASKS, TASKS, format_table  # noqa: F401  (format_table re-exported)

STANDARD_REPORTS: tuple[str, ...] = tuple(TASKS[t].report for t in STANDARD_TASKS)  # the 7 standard tasks


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError:
        raise PromcseError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, results: list[dict[str, Any]], names: list[str]) -> None:
    """Grouped bars: the 7 standard tasks and Avg on x, one bar per model (missing values left out)."""
    labels = [*STANDARD_REPORTS, "Avg"]
    width = 0.8 / len(results)
    lowest = 100.0
    for m, (result, name) in enumerate(zip(results, names)):
        tasks = result.get("tasks", {})
        values = [tasks[t]["spearman"] if t in tasks else None for t in STANDARD_REPORTS] + [result.get("avg")]
        xs = [i + (m - (len(results) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        partial = sum(v is not None for v in values[:-1])
        label = name if partial == len(STANDARD_REPORTS) else f"{name} (Avg of {partial} tasks)"
        bars = ax.bar(xs, [v for v in values if v is not None], width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        lowest = min([lowest, *[v for v in values if v is not None]])
    ax.set_ylim(max(0.0, 10 * (lowest // 10) - 10), 100)  # zoom in: differences of a point must be visible
    ax.set_xticks(range(len(labels)), ["STS-B" if t == "STSBenchmark" else t for t in labels])
    ax.set_ylabel("Spearman x100 (higher is better)")
    ax.set_title("STS test sets")
    ax.legend(fontsize="small")


def _scatter(ax: Any, results: list[dict[str, Any]], names: list[str]) -> None:
    """Alignment (y) against uniformity (x), one labelled point per model that has both."""
    both = [(r, n) for r, n in zip(results, names) if "uniformity" in r and "alignment" in r]
    shown = [(r["uniformity"], r["alignment"], n) for r, n in both]
    for x, y, name in shown:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    if not shown:
        ax.text(0.5, 0.5, "no alignment/uniformity\n(evaluate with stsb)", ha="center", va="center",
                transform=ax.transAxes)
    ax.margins(0.2)
    ax.set_xlabel("uniformity (lower is better)")
    ax.set_ylabel("alignment (lower is better)")
    ax.set_title("Alignment vs uniformity (STS-B test)")


def plot_results(results: list[dict[str, Any]], names: list[str], path: str | Path) -> Path:
    """Save a PNG: grouped bars of the 7 STS tasks + Avg per model, and an alignment-uniformity scatter.

    Args:
        results: Dicts returned by :func:`promcse.evaluation.sts.evaluate`, one per model.
        names: Model names, one per result (legend and point labels).
        path: PNG file to write; its parent folder is created.

    Returns:
        The path written.

    Raises:
        PromcseError: matplotlib missing, no results, or names not matching results.
    """
    if not results or len(results) != len(names):
        raise PromcseError(f"plot_results needs one name per result; got {len(results)} results, {len(names)} names")
    plt = _pyplot()
    fig, (ax_bars, ax_au) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    try:
        _bars(ax_bars, results, names)
        _scatter(ax_au, results, names)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=120)
    finally:
        plt.close(fig)
    return out
