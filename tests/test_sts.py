"""Tests of promcse.evaluation.sts (STS protocol, alignment/uniformity, score_split, the table) and promcse.evaluation.plots,
with a fake encoder. CxC: tests/test_cxc.py."""

from __future__ import annotations

import csv
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from promcse.evaluation import sts
from promcse.errors import PromcseError

WORDS = "a man woman dog cat plays runs eats sits on the red big small park guitar ball table food".split()


def fake_encode(texts: list[str], dim: int = 64) -> np.ndarray:
    """Deterministic bag of hashed character trigrams (crc32, not Python's salted hash)."""
    out = np.zeros((len(texts), dim))
    for i, text in enumerate(texts):
        padded = f"  {text.lower()} "
        for j in range(len(padded) - 2):
            h = zlib.crc32(padded[j : j + 3].encode())
            out[i, h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    return out


class CountingEncoder:
    """Records every call of the fake encoder."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return fake_encode(texts)


def make_rows(seed: int, n: int) -> list[tuple[str, str, float]]:
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        s1 = " ".join(rng.choice(WORDS, 5))
        s2 = " ".join(rng.choice(WORDS, 5)) if rng.rand() < 0.7 else s1 + " " + rng.choice(WORDS)
        rows.append((s1, s2, round(float(rng.uniform(0, 5)), 2)))
    rows.append(("shared sentence one", "shared sentence two", 4.5))  # repeated in every file
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str, float]] | list[tuple[str, ...]], header: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header or "sentence1\tsentence2\tscore"] + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


LAYOUT = {
    "STS12": {"MSRpar": 12, "MSRvid": 9, "SMTeuroparl": 7},
    "STS13": {"FNWN": 6, "headlines": 8},
    "STS14": {"images": 10},
    "STS15": {"belief": 6, "images": 5},
    "STS16": {"plagiarism": 7},
    "STSBenchmark": {"dev": 8, "test": 15, "train": 5},
    "SICK": {"test": 9, "train": 4, "trial": 4},
}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for seed, (task, subs) in enumerate(LAYOUT.items()):
        for k, (sub, n) in enumerate(subs.items()):
            write_tsv(root / "tsv" / "original" / task / f"{sub}.tsv", make_rows(seed * 10 + k, n))
    return root


def read_rows_manually(path: Path) -> tuple[list[str], list[str], list[float]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["score"]) for r in rows]


def pair_cosines(s1: list[str], s2: list[str]) -> list[float]:
    out = []
    for a, b in zip(s1, s2):
        u, v = fake_encode([a])[0], fake_encode([b])[0]
        out.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))
    return out


def test_parse_tasks() -> None:
    assert sts.parse_tasks("all") == list(sts.STANDARD_TASKS)
    assert sts.parse_tasks(" STSB, sts12,stsb ,stsb-dev") == ["stsb", "sts12", "stsb-dev"]
    assert sts.parse_tasks(["SICK-R", "all"])[0] == "sickr"
    with pytest.raises(PromcseError, match=r"unknown STS task 'sts-12' \(did you mean 'sts12'\?\).*stsb-dev"):
        sts.parse_tasks("STS-12")
    with pytest.raises(PromcseError, match="no STS task"):
        sts.parse_tasks(" , ")


def test_grouped_task_all_wmean_subsets(data_dir: Path) -> None:
    result = sts.evaluate(fake_encode, "sts12", data_dir=data_dir)
    row = result["tasks"]["STS12"]
    files = sorted((data_dir / "tsv/original/STS12").glob("*.tsv"))
    sims: list[float] = []
    golds: list[float] = []
    weighted, total = 0.0, 0
    for path in files:
        s1, s2, gold = read_rows_manually(path)
        cos = pair_cosines(s1, s2)
        rho = 100 * spearmanr(cos, gold)[0]
        assert row["subsets"][path.stem] == pytest.approx(rho, abs=1e-9)
        weighted, total = weighted + len(gold) * rho, total + len(gold)
        sims, golds = sims + cos, golds + gold
    assert row["spearman"] == pytest.approx(100 * spearmanr(sims, golds)[0], abs=1e-9)
    assert row["wmean"] == pytest.approx(weighted / total, abs=1e-9)
    assert row["n"] == total == 12 + 9 + 7 + 3
    assert list(row["subsets"]) == ["MSRpar", "MSRvid", "SMTeuroparl"]
    assert row["spearman"] != pytest.approx(row["wmean"])


def test_all_shape_avg_and_single_encode_call(data_dir: Path) -> None:
    enc = CountingEncoder()
    result = sts.evaluate(enc, "all", data_dir=data_dir)
    assert list(result) == ["text", "tasks", "avg", "uniformity", "alignment"]
    assert list(result["tasks"]) == ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICK-R"]
    assert set(result["tasks"]["STSBenchmark"]) == {"spearman", "n"}
    assert set(result["tasks"]["STS16"]) == {"spearman", "wmean", "subsets", "n"}
    assert result["avg"] == pytest.approx(np.mean([v["spearman"] for v in result["tasks"].values()]))
    json.dumps(result)
    # one call, on distinct sentences only, covering exactly the reported test files (not dev/train)
    assert len(enc.calls) == 1 and len(enc.calls[0]) == len(set(enc.calls[0]))
    expected: set[str] = set()
    for task, subs in LAYOUT.items():
        for sub in subs:
            if task in ("STSBenchmark", "SICK") and sub != "test":
                continue
            s1, s2, _ = read_rows_manually(data_dir / "tsv/original" / task / f"{sub}.tsv")
            expected |= set(s1) | set(s2)
    assert set(enc.calls[0]) == expected
    table = sts.format_table(result, "fake")
    assert "STS12" in table and "SICK-R" in table and "Avg" in table and "alignment / uniformity" in table


def test_batch_texts_chunks_give_same_numbers(data_dir: Path) -> None:
    enc = CountingEncoder()
    chunked = sts.evaluate(enc, "sts12,stsb", data_dir=data_dir, batch_texts=7)
    assert len(enc.calls) > 1 and max(len(c) for c in enc.calls) <= 7
    whole = sts.evaluate(fake_encode, "sts12,stsb", data_dir=data_dir)
    assert flatten(chunked) == pytest.approx(flatten(whole), abs=1e-9)


def flatten(result: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            out[prefix + key] = value
    return out


def test_alignment_uniformity_against_loops() -> None:
    rng = np.random.RandomState(0)
    a, b, x = rng.randn(6, 5), rng.randn(6, 5), rng.randn(9, 5)
    unit = [v / np.linalg.norm(v) for v in x]
    loop_align = sum(np.sum((a[i] / np.linalg.norm(a[i]) - b[i] / np.linalg.norm(b[i])) ** 2) for i in range(6)) / 6
    terms = [math.exp(-2 * np.sum((unit[i] - unit[j]) ** 2)) for i in range(9) for j in range(i + 1, 9)]
    assert sts.alignment(a, b) == pytest.approx(loop_align, rel=1e-12)
    assert sts.uniformity(x) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-12)
    assert sts.uniformity(x, block=2) == pytest.approx(sts.uniformity(x), rel=1e-12)


def test_evaluate_alignment_uniformity_on_stsb_test(data_dir: Path) -> None:
    result = sts.evaluate(fake_encode, "stsb", data_dir=data_dir)
    s1, s2, gold = read_rows_manually(data_dir / "tsv/original/STSBenchmark/test.tsv")
    pos = [i for i, g in enumerate(gold) if g > 4]
    assert result["alignment"] == pytest.approx(
        sts.alignment(fake_encode([s1[i] for i in pos]), fake_encode([s2[i] for i in pos])), rel=1e-9)
    distinct = sorted(set(s1) | set(s2))
    assert result["uniformity"] == pytest.approx(sts.uniformity(fake_encode(distinct)), rel=1e-9)
    no_au = sts.evaluate(fake_encode, "sts12,stsb-dev", data_dir=data_dir)
    assert "alignment" not in no_au and "uniformity" not in no_au
    assert "alignment" not in sts.evaluate(fake_encode, "stsb", data_dir=data_dir, alignment_uniformity=False)


def test_tsv_files_and_bundled_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sts.DATA_ENV, raising=False)
    extra = write_tsv(tmp_path / "mine" / "test.tsv", make_rows(7, 6))
    other = write_tsv(tmp_path / "other" / "test.tsv", make_rows(8, 6))
    result = sts.evaluate(fake_encode, "", tsv_files=[extra, other])
    assert list(result["tasks"]) == ["test", "other/test"] and result["avg"] is None
    s1, s2, gold = read_rows_manually(extra)
    assert result["tasks"]["test"]["spearman"] == pytest.approx(100 * spearmanr(pair_cosines(s1, s2), gold)[0])
    bundled = sts.evaluate(fake_encode, "stsb,stsb-dev")
    assert bundled["tasks"]["STSBenchmark"]["n"] == 1379 and "uniformity" in bundled
    monkeypatch.setenv(sts.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(PromcseError, match="PROMCSE_DATA_DIR"):
        sts.evaluate(fake_encode, "stsb")


def test_env_data_dir(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sts.DATA_ENV, str(data_dir))
    assert sts.evaluate(fake_encode, "sts13")["tasks"]["STS13"]["n"] == 6 + 8 + 1 + 1


@pytest.mark.parametrize(
    ("content", "message", "line"),
    [
        ("sentence1\tscore\na\t1\nb\t2\nc\t3\n", "missing column", 1),
        ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\tmany\ne\tf\t2\n", "not a number", 3),
        ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\tnan\ne\tf\t2\n", "not finite", 3),
        ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\n", "at least 3", None),
        ("sentence1\tsentence2\tscore\tscore\na\tb\t1\t1\nc\td\t2\t2\ne\tf\t3\t3\n", "duplicate column", 1),
        ("sentence1\tsentence2\tscore\na\tb\t1\nsentence1\tsentence2\tscore\ne\tf\t2\ng\th\t3\n", "not a number", 3),
    ],
)
def test_bad_sts_files(data_dir: Path, content: str, message: str, line: int | None) -> None:
    path = data_dir / "tsv/original/STS12/MSRpar.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromcseError, match=message) as info:
        sts.evaluate(fake_encode, "sts12", data_dir=data_dir)
    assert info.value.path == str(path) and info.value.line == line


def test_bad_tasks_and_paths(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sts.DATA_ENV, raising=False)
    with pytest.raises(PromcseError, match="did you mean 'sick'"):
        sts.evaluate(fake_encode, "sickk", data_dir=data_dir)
    with pytest.raises(PromcseError, match="give its folder or set PROMCSE_DATA_DIR"):
        sts.evaluate(fake_encode, "sts12")
    with pytest.raises(PromcseError, match="not found") as info:
        sts.evaluate(fake_encode, "stsb", data_dir=tmp_path / "missing")
    assert info.value.path == str(tmp_path / "missing")
    (data_dir / "tsv/original/STSBenchmark/test.tsv").unlink()
    with pytest.raises(PromcseError, match="sub-file") as info:
        sts.evaluate(fake_encode, "stsb", data_dir=data_dir)
    assert info.value.path.endswith("STSBenchmark/test.tsv")
    with pytest.raises(PromcseError, match="folder") as info:
        sts.evaluate(fake_encode, "sts12", data_dir=data_dir, text="senteval")
    assert info.value.path.endswith("senteval/STS12")
    with pytest.raises(PromcseError, match="text variant"):
        sts.evaluate(fake_encode, "sts12", data_dir=data_dir, text="tokenised")
    with pytest.raises(PromcseError, match="encoder returned"):
        sts.evaluate(lambda t: np.zeros((len(t) - 1, 4)), "sts13", data_dir=data_dir)


def test_score_split_matches_evaluate(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for task, report in [("stsb-dev", "STSBenchmark-dev"), ("stsb", "STSBenchmark"), ("SICK-R", "SICK-R")]:
        full = sts.evaluate(fake_encode, task, data_dir=data_dir)["tasks"][report]["spearman"]
        assert sts.score_split(fake_encode, task, data_dir) == full
    monkeypatch.setenv(sts.DATA_ENV, str(data_dir))
    assert sts.score_split(fake_encode, "sts12") == sts.evaluate(fake_encode, "sts12")["tasks"]["STS12"]["spearman"]
    monkeypatch.delenv(sts.DATA_ENV)
    bundled = sts.evaluate(fake_encode, "stsb-dev")["tasks"]["STSBenchmark-dev"]["spearman"]
    assert sts.score_split(fake_encode, " STSB-dev ") == bundled  # no data dir: the bundled STS-B
    enc = CountingEncoder()
    sts.score_split(enc, "stsb", data_dir)
    s1, s2, _ = read_rows_manually(data_dir / "tsv/original/STSBenchmark/test.tsv")
    assert len(enc.calls) == 1 and set(enc.calls[0]) == set(s1) | set(s2)  # test split only, no uniformity extra
    for bad in ("all", "stsbb", "sts12,stsb"):
        with pytest.raises(PromcseError, match="unknown STS task"):
            sts.score_split(fake_encode, bad, data_dir)


def test_format_table_has_one_home() -> None:
    from promcse.evaluation import plots

    assert plots.format_table is sts.format_table
    assert plots.STANDARD_REPORTS == tuple(sts.TASKS[t].report for t in sts.STANDARD_TASKS)


def test_plot_results(tmp_path: Path, data_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    from promcse.evaluation.plots import plot_results

    one = sts.evaluate(fake_encode, "all", data_dir=data_dir)
    two = sts.evaluate(lambda t: fake_encode(t, dim=32), "sts12,stsb", data_dir=data_dir)
    out = plot_results([one, two], ["fake64", "fake32"], tmp_path / "plots" / "results.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    with pytest.raises(PromcseError, match="one name per result"):
        plot_results([one], ["a", "b"], tmp_path / "x.png")
