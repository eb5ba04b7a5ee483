"""Build the experiment table (markdown) and plots from experiments/results/*.json.

Usage: python experiments/make_report.py [--out docs/results] [--rows row1_frozen,row7_p20,...] [--no-plots]
(prints the markdown table: every row, or the named rows in that order)

The Quality table of docs/RESULTS.md is built from a labels file (rows in its order, each shown with its label, the
compact columns) and written in place:
    python experiments/make_report.py --no-plots --labels experiments/quality_rows.json --update docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICK-R"]
# Columns a compact (labelled) table leaves out: they stay in the full table and in the result JSONs.
COMPACT_DROP = ("align", "uniform", "ckpt", "train s")


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


def load_labels(path: Path) -> dict[str, dict[str, str]]:
    """Read a labels file: a JSON object ``{row: {"label": str, "trainable": str (optional)}}``, in table order."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read labels file: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: labels file must be a JSON object of row -> {{\"label\": ...}}")
    for row, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise SystemExit(f"{path}: row {row!r} needs a string \"label\"")
        unknown = set(entry) - {"label", "trainable"}
        if unknown:
            raise SystemExit(f"{path}: row {row!r} has unknown key(s) {sorted(unknown)}")
    return data


def table(rows: dict[str, list[dict]], order: list[str] | None = None,
          labels: dict[str, dict[str, str]] | None = None) -> str:
    """The markdown table; with ``labels``, rows follow the labels file and the compact columns are kept."""
    head = ["row", "seeds", *[t.replace("STSBenchmark", "STS-B") for t in TASKS], "Avg", "CxC", "CxC boot",
            "align", "uniform", "trainable", "ckpt", "train s"]
    lines = []
    if labels is not None:
        order = order or list(labels)
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
        if labels is not None:
            entry = labels.get(name, {"label": name})
            cells[0] = entry["label"]
            cells[head.index("trainable")] = entry.get("trainable", cells[head.index("trainable")])
            cells = [c for h, c in zip(head, cells) if h not in COMPACT_DROP]
        lines.append("| " + " | ".join(cells) + " |")
    shown = [h for h in head if labels is None or h not in COMPACT_DROP]
    return "\n".join(["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown), *lines])


def update_file(path: Path, new_table: str) -> None:
    """Replace, in ``path``, the markdown table whose header line equals ``new_table``'s (up to the next blank line)."""
    text = path.read_text()
    header = new_table.splitlines()[0]
    start = text.find(header + "\n")
    if start < 0:
        raise SystemExit(f"{path}: no table with the header {header!r} to update")
    end = text.find("\n\n", start)
    end = len(text) if end < 0 else end
    path.write_text(text[:start] + new_table + text[end:])


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
    parser.add_argument("--labels", default="", help="JSON file of row -> {label, trainable}: its rows, its labels, "
                        "compact columns")
    parser.add_argument("--update", default="", help="markdown file whose table with the same header is replaced")
    args = parser.parse_args()
    rows = load_results()
    labels = load_labels(Path(args.labels)) if args.labels else None
    text = table(rows, [r for r in args.rows.split(",") if r] or None, labels)
    print(text)
    if args.update:
        update_file(Path(args.update), text)
    if not args.no_plots:
        plots(rows, Path(args.out))


if __name__ == "__main__":
    main()
