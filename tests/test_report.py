"""experiments/make_report.py: the labelled (compact) table and the in-place update of a markdown file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("make_report", ROOT / "experiments" / "make_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(row: str, avg: float, seed: int) -> dict:
    tasks = {t: {"spearman": avg + i} for i, t in enumerate(_report().TASKS)}
    return {"row": row, "seed": seed, "tasks": tasks, "avg": avg, "cxc": {"spearman": 70.0, "bootstrap_mean": 70.5},
            "alignment": 0.2, "uniformity": -2.0, "trainable_params": 1234, "checkpoint_bytes": 0,
            "train_seconds": 10.0}


def test_labelled_table_follows_labels_and_drops_compact_columns(tmp_path: Path) -> None:
    report = _report()
    rows = {"a": [_run("a", 80.0, 42), _run("a", 82.0, 43)], "b": [_run("b", 79.0, 42)]}
    labels_path = tmp_path / "labels.json"
    labels_path.write_text(json.dumps({"b": {"label": "b (first)", "trainable": "0 (9 M)"}, "a": {"label": "a (two)"}}))
    lines = report.table(rows, labels=report.load_labels(labels_path)).splitlines()
    assert lines[0].split(" | ")[-1] == "trainable |"
    assert "align" not in lines[0] and "train s" not in lines[0]
    assert lines[2].startswith("| b (first) | 1 |") and lines[2].endswith("| 0 (9 M) |")
    # mean ± sample std over the two seeds of row a
    assert lines[3].startswith("| a (two) | 2 |") and "81.00 ± 1.41" in lines[3]
    assert len(lines[2].split("|")) == len(lines[0].split("|"))


def test_unlabelled_table_keeps_every_column() -> None:
    report = _report()
    text = report.table({"a": [_run("a", 80.0, 42)]})
    assert text.splitlines()[0].endswith("| trainable | ckpt | train s |")


def test_update_replaces_only_the_matching_table(tmp_path: Path) -> None:
    report = _report()
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n\n| x | y |\n|---|---|\n| old | 1 |\n\nbetween\n\n| z |\n|---|\n| keep |\n")
    report.update_file(doc, "| x | y |\n|---|---|\n| new | 2 |")
    assert doc.read_text() == "intro\n\n| x | y |\n|---|---|\n| new | 2 |\n\nbetween\n\n| z |\n|---|\n| keep |\n"
    with pytest.raises(SystemExit, match="no table"):
        report.update_file(doc, "| nope |\n|---|")


def test_bad_labels_file_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"a": {"label": "ok", "colour": "red"}}))
    with pytest.raises(SystemExit, match=r"labels.json: row 'a' has unknown key"):
        _report().load_labels(path)


def test_committed_quality_labels_cover_committed_results() -> None:
    report = _report()
    labels = report.load_labels(ROOT / "experiments" / "quality_rows.json")
    missing = set(labels) - set(report.load_results())
    assert not missing, f"quality_rows.json names rows without results: {sorted(missing)}"
