"""Build the experiment table (markdown) and plots from experiments/results/*.json.

Usage: python experiments/make_report.py [--out docs/results] [--rows row1_frozen,row7_p20,...] [--no-plots]
(prints the markdown table: every row, or the named rows in that order)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICK-R"]


def load_results() -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((ROOT / "experiments" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        rows[data["row"]].append(data)
    return rows


def fmt(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, list[dict]], order: list[str] | None = None) -> str:
    head = ["row", "seeds", *[t.replace("STSBenchmark", "STS-B") for t in TASKS], "Avg", "CxC", "CxC boot",
            "align", "uniform", "trainable", "ckpt", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order or sorted(rows):
        if name not in rows:
            raise SystemExit(f"no results for row {name} under experiments/results/")
        runs = rows[name]
        cells = [name, str(len(runs))]
        cells += [fmt([r["tasks"][t]["spearman"] for r in runs]) for t in TASKS]
        cells.append(fmt([r["avg"] for r in runs]))
        cells.append(fmt([r["cxc"]["spearman"] for r in runs]))
        cells.append(fmt([r["cxc"]["bootstrap_mean"] for r in runs]))
        cells.append(fmt([r["alignment"] for r in runs], 3))
        cells.append(fmt([r["uniformity"] for r in runs], 3))
        cells.append(f"{runs[0]['trainable_params']:,}")
        cells.append(f"{runs[0]['checkpoint_bytes'] / 1e6:.2f} MB" if runs[0]["checkpoint_bytes"] else "–")
        cells.append(f"{statistics.mean(r['train_seconds'] for r in runs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in sorted(rows.items()):
        run = runs[0]
        curve = run.get("curve") or []
        loss = [(c["step"], c["loss"]) for c in curve if "loss" in c]
        dev = [(c["step"], c["stsb_dev"]) for c in curve if "stsb_dev" in c]
        if loss:
            axes[0].plot(*zip(*loss), label=name)
        if dev:
            axes[1].plot(*zip(*dev), marker="o", label=name)
    axes[0].set(title="training loss (seed of first run)", xlabel="step", ylabel="loss")
    axes[1].set(title="STS-B dev Spearman x100", xlabel="step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, runs in sorted(rows.items()):
        u = statistics.mean(r["uniformity"] for r in runs)
        a = statistics.mean(r["alignment"] for r in runs)
        ax.scatter(u, a)
        ax.annotate(f"{name} ({statistics.mean(r['avg'] for r in runs):.1f})", (u, a), fontsize=7)
    ax.set(title="alignment vs uniformity on STS-B (lower is better on both)", xlabel="uniformity", ylabel="alignment")
    fig.tight_layout()
    fig.savefig(out / "align_uniform.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--rows", default="", help="comma-separated rows to print, in this order (default: all)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    args = parser.parse_args()
    rows = load_results()
    print(table(rows, [r for r in args.rows.split(",") if r] or None))
    if not args.no_plots:
        plots(rows, Path(args.out))


if __name__ == "__main__":
    main()
