"""``promcse mine``: hard negatives checked against a brute-force reference written plainly here.

Most tests use :class:`TableEncoder`, whose vectors are drawn per text from a seeded generator (positives
are their anchor plus noise), so that cosine ranks have no near-ties; the CLI tests use the tiny random BERT.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sentences

from promcse.cli import main
from promcse.io.data import TrainExamples, read_training_file
from promcse.errors import PromcseError
from promcse.cli.mine import parse_range
from promcse.corpus.mine import MineConfig, MinedResult, mine_hard_negatives
from promcse.corpus.mine_files import format_report, read_corpus, write_mined

DIM = 16


class TableEncoder:
    """Fixed vectors per text (``table``), else a vector drawn from a generator seeded by the text's hash."""

    def __init__(self, table: dict[str, np.ndarray] | None = None) -> None:
        self.table = table or {}
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> np.ndarray:
        if text in self.table:
            return self.table[text]
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
        return np.random.default_rng(seed).standard_normal(DIM)

    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = True,
               show_progress: bool = False) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.array([self.vector(t) for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


def make_pairs(n: int = 50, seed: int = 0) -> tuple[TrainExamples, TableEncoder]:
    """Anchors ``a{i}`` with positives ``p{i}`` near them and hard negatives ``n{i}``; a0 and a1 repeat with a
    second positive, and one anchor's positive is another row's anchor."""
    rng = np.random.default_rng(seed)
    table: dict[str, np.ndarray] = {}
    anchors, positives, negatives = [], [], []
    for i in range(n):
        base = rng.standard_normal(DIM)
        table[f"a{i}"], table[f"p{i}"] = base, base + 0.6 * rng.standard_normal(DIM)
        table[f"n{i}"] = rng.standard_normal(DIM)
        anchors.append(f"a{i}"), positives.append(f"p{i}"), negatives.append(f"n{i}")
    for i in (0, 1):
        table[f"q{i}"] = table[f"a{i}"] + 0.6 * rng.standard_normal(DIM)
        anchors.append(f"a{i}"), positives.append(f"q{i}"), negatives.append(f"n{i + 2}")
    anchors.append("a5"), positives.append("a6"), negatives.append("n9")
    return TrainExamples(anchors, positives, negatives, source="pairs"), TableEncoder(table)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(encoder: TableEncoder, pairs: TrainExamples, corpus: list[str], config: MineConfig
              ) -> tuple[list[tuple[str, str, list[str]]], dict[str, int]]:
    """Brute force: the full cosine matrix, a sort per row, the filters written out. Returns the kept rows
    (anchor, positive, negatives) in input order and the counts."""
    texts = list(dict.fromkeys(corpus))
    corpus_vecs = unit(np.array([encoder.vector(t) for t in texts]))
    positives = pairs.positive if pairs.positive is not None else pairs.anchor
    rows, counts = [], {"in_range": 0, "margin": 0, "max_score": 0, "short": 0}
    for anchor, positive in zip(pairs.anchor, positives):
        a = unit(encoder.vector(anchor))
        scores = corpus_vecs @ a
        own = {p for x, p in zip(pairs.anchor, positives) if x == anchor}
        order = sorted(range(len(texts)), key=lambda j: -scores[j])
        candidates = [j for j in order if texts[j] != anchor and texts[j] not in own]
        window = candidates[config.range_min - 1: config.range_max]
        counts["in_range"] += len(window)
        pos = 1.0 if pairs.positive is None else float(a @ unit(encoder.vector(positive)))
        passing = []
        for j in window:
            if config.margin is not None and scores[j] > pos - config.margin:
                counts["margin"] += 1
            elif config.max_score is not None and scores[j] > config.max_score * pos:
                counts["max_score"] += 1
            else:
                passing.append(texts[j])
        if len(passing) < config.per_anchor:
            counts["short"] += 1
            continue
        rows.append((anchor, positive, passing[: config.per_anchor]))
    return rows, counts


def rows_of(result: MinedResult) -> list[tuple[str, str, list[str]]]:
    return list(zip(result.anchor, result.positive, result.negatives))


def cos(encoder: TableEncoder, a: str, b: str) -> float:
    return float(unit(encoder.vector(a)) @ unit(encoder.vector(b)))


def corpus_of(pairs: TrainExamples) -> list[str]:
    return [*pairs.anchor, *(pairs.positive or []), *(pairs.negative or [])]


CONFIGS = [
    MineConfig(range_min=1, range_max=5),
    MineConfig(range_min=3, range_max=12, margin=0.1),
    MineConfig(range_min=2, range_max=20, max_score=0.8),
    MineConfig(range_min=1, range_max=30, margin=0.0, per_anchor=4),
    MineConfig(range_min=10, range_max=50, max_score=0.5, per_anchor=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_top_equals_the_brute_force_reference(config: MineConfig) -> None:
    pairs, encoder = make_pairs()
    result = mine_hard_negatives(encoder, pairs, None, config)
    expected, counts = reference(encoder, pairs, corpus_of(pairs), config)
    assert rows_of(result) == expected
    s = result.stats
    assert (s.in_range, s.dropped_margin, s.dropped_max_score, s.rows_short) == (
        counts["in_range"], counts["margin"], counts["max_score"], counts["short"])
    assert s.rows_in == len(pairs) and s.rows_out == len(expected) == len(result)
    assert s.corpus == len(set(corpus_of(pairs))) and s.anchors == len(set(pairs.anchor))
    if config.margin is not None or config.max_score is not None:
        assert s.dropped_margin + s.dropped_max_score > 0  # the filter did something here
    for scores, (anchor, _, negatives) in zip(result.negative_scores, expected):
        assert scores == pytest.approx([cos(encoder, anchor, n) for n in negatives], abs=1e-6)
    assert s.negative_mean == pytest.approx(np.mean(result.negative_scores))
    assert s.positive_mean == pytest.approx(np.mean([cos(encoder, a, p) for a, p, _ in expected]))


@pytest.mark.parametrize("strategy", ["top", "random"])
def test_negatives_are_never_the_anchor_or_one_of_its_positives(strategy: str) -> None:
    pairs, encoder = make_pairs()
    result = mine_hard_negatives(encoder, pairs, None, MineConfig(range_min=1, range_max=8, per_anchor=8,
                                                                  strategy=strategy))
    positives = {a: {p for x, p in zip(pairs.anchor, pairs.positive) if x == a} for a in pairs.anchor}
    assert len(result) == len(pairs)  # ranks 1-8 from ~150 sentences: every row gets its 8
    assert {"q0", "p0"} <= positives["a0"]
    for anchor, negatives in zip(result.anchor, result.negatives):
        assert anchor not in negatives and not positives[anchor] & set(negatives)
        assert len(set(negatives)) == len(negatives)
    # the two rows of a0 (positives p0 and q0) both exclude both
    assert all("p0" not in n and "q0" not in n for a, n in zip(result.anchor, result.negatives) if a == "a0")


@pytest.mark.parametrize("strategy", ["top", "random"])
def test_the_filters_hold_on_the_chosen_negatives(strategy: str) -> None:
    pairs, encoder = make_pairs()
    for config in (MineConfig(range_min=1, range_max=40, margin=0.05, per_anchor=3, strategy=strategy),
                   MineConfig(range_min=1, range_max=40, max_score=0.7, per_anchor=3, strategy=strategy)):
        result = mine_hard_negatives(encoder, pairs, None, config)
        assert len(result) > 10
        for anchor, positive, negatives in rows_of(result):
            limit = (cos(encoder, anchor, positive) - config.margin if config.margin is not None
                     else config.max_score * cos(encoder, anchor, positive))
            assert all(cos(encoder, anchor, n) <= limit + 1e-6 for n in negatives), (anchor, negatives)


@pytest.mark.parametrize("strategy", ["top", "random"])
def test_the_rank_range_is_respected(strategy: str) -> None:
    pairs, encoder = make_pairs()
    config = MineConfig(range_min=6, range_max=15, per_anchor=5, strategy=strategy, seed=3)
    result = mine_hard_negatives(encoder, pairs, None, config)
    texts = list(dict.fromkeys(corpus_of(pairs)))
    own = {a: {p for x, p in zip(pairs.anchor, pairs.positive) if x == a} for a in pairs.anchor}
    for anchor, negatives in zip(result.anchor, result.negatives):
        others = [t for t in texts if t != anchor and t not in own[anchor]]
        ranked = sorted(others, key=lambda t: -cos(encoder, anchor, t))
        ranks = [ranked.index(n) + 1 for n in negatives]
        assert all(6 <= r <= 15 for r in ranks) and ranks == sorted(ranks)


def test_random_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    pairs, encoder = make_pairs()

    def run(strategy: str, seed: int) -> list[list[str]]:
        config = MineConfig(range_min=1, range_max=30, per_anchor=2, strategy=strategy, seed=seed)
        return mine_hard_negatives(encoder, pairs, None, config).negatives

    first = run("random", 0)
    assert run("random", 0) == first
    assert run("random", 1) != first and run("top", 0) != first


def test_a_given_corpus_is_the_only_source_of_negatives() -> None:
    pairs, encoder = make_pairs()
    corpus = [f"c{i}" for i in range(40)] + ["c3", "a7"]  # a duplicate, and one input sentence
    config = MineConfig(range_min=2, range_max=9, per_anchor=2, margin=0.0)
    result = mine_hard_negatives(encoder, pairs, corpus, config)
    assert {n for row in result.negatives for n in row} <= set(corpus)
    assert result.stats.corpus == 41
    expected, _ = reference(encoder, pairs, corpus, config)
    assert rows_of(result) == expected


def test_k_columns_and_the_training_reader_reads_the_output_back(tmp_path: Path) -> None:
    table = {"a, with \"quotes\", and commas": np.ones(DIM)}
    base, encoder = make_pairs()
    encoder.table.update(table)
    pairs = TrainExamples([*base.anchor, *table], [*base.positive, "p3"], [*base.negative, "n3"], "pairs")
    one = mine_hard_negatives(encoder, pairs, None, MineConfig(range_min=2, range_max=6))
    write_mined(one, tmp_path / "one.csv")
    back = read_training_file(tmp_path / "one.csv", require_hard_negatives=True)
    assert (back.anchor, back.positive, back.negative) == (one.anchor, one.positive, [n[0] for n in one.negatives])
    assert (tmp_path / "one.csv").read_text(encoding="utf-8").splitlines()[0] == "sent0,sent1,hard_neg"
    three = mine_hard_negatives(encoder, pairs, None, MineConfig(range_min=2, range_max=6, per_anchor=3))
    for name in ("three.csv", "three.jsonl"):
        write_mined(three, tmp_path / name)
        back = read_training_file(tmp_path / name)
        assert (back.anchor, back.positive) == (three.anchor, three.positive)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "three.csv").read_text(encoding="utf-8"))))
    assert list(rows[0]) == ["sent0", "sent1", "hard_neg_1", "hard_neg_2", "hard_neg_3"]
    assert [[r[f"hard_neg_{i}"] for i in (1, 2, 3)] for r in rows] == three.negatives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "three.csv", "three.jsonl"]  # no temporaries


def test_txt_input_makes_each_sentence_its_own_positive(tmp_path: Path) -> None:
    _, encoder = make_pairs()
    sentences = [f"a{i}" for i in range(30)] + [f"p{i}" for i in range(30)]
    path = tmp_path / "sents.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    pairs = read_training_file(path)
    config = MineConfig(range_min=1, range_max=10, max_score=0.6, per_anchor=2)
    result = mine_hard_negatives(encoder, pairs, None, config)
    assert result.unsupervised and result.anchor == result.positive and set(result.positive_scores) == {1.0}
    expected, counts = reference(encoder, pairs, sentences, config)
    assert rows_of(result) == expected and result.stats.dropped_max_score == counts["max_score"] > 0
    assert all(max(s) <= 0.6 + 1e-6 for s in result.negative_scores)  # against a positive score of 1
    assert all(a not in n for a, n in zip(result.anchor, result.negatives))
    assert "its own positive" in format_report(result)


def test_rows_without_enough_negatives_are_dropped_and_counted(tmp_path: Path) -> None:
    pairs, encoder = make_pairs(n=6)
    config = MineConfig(range_min=1, range_max=20, margin=0.0, per_anchor=8)
    result = mine_hard_negatives(encoder, pairs, None, config)
    expected, counts = reference(encoder, pairs, corpus_of(pairs), config)
    assert rows_of(result) == expected and result.stats.rows_short == counts["short"] > 0
    report = format_report(result)
    assert re.search(rf"fewer than 8 negative\(s\) +{counts['short']}\n", report), report
    starved = mine_hard_negatives(encoder, pairs, ["p0", "x"], MineConfig(range_min=1, range_max=3, per_anchor=3))
    assert len(starved) == 0 and starved.stats.rows_short == len(pairs)
    with pytest.raises(PromcseError, match="no row got 3 negative"):
        write_mined(starved, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"range_min": 50, "range_max": 10}, "key 'range_min': ranks 50-10"),
    ({"range_min": 0, "range_max": 10}, "key 'range_min': ranks 0-10"),
    ({"margin": 0.1, "max_score": 0.9}, "mutually exclusive"),
    ({"range_min": 1, "range_max": 5, "per_anchor": 6}, "key 'per_anchor': 6 negatives per row"),
    ({"strategy": "hardest"}, "key 'strategy'"),
    ({"index_kind": "annoy"}, "key 'index_kind'"),
])
def test_bad_options_are_refused_before_any_encoding(kwargs: dict, message: str) -> None:
    pairs, encoder = make_pairs(n=4)
    with pytest.raises(PromcseError, match=message):
        mine_hard_negatives(encoder, pairs, None, MineConfig(**kwargs))
    assert encoder.calls == []


def test_parse_range() -> None:
    assert parse_range("10-50") == (10, 50) and parse_range(" 3 - 3 ") == (3, 3)
    for bad in ("50-10", "0-5", "10", "a-b", "-5", "1-2-3"):
        with pytest.raises(PromcseError, match="--range"):
            parse_range(bad)


def test_empty_pairs_and_empty_corpus_are_refused() -> None:
    _, encoder = make_pairs(n=2)
    with pytest.raises(PromcseError, match="no rows"):
        mine_hard_negatives(encoder, TrainExamples([], [], None, "empty.csv"), None, MineConfig())
    with pytest.raises(PromcseError, match="corpus is empty"):
        mine_hard_negatives(encoder, TrainExamples(["a"], ["b"], None, "x"), [], MineConfig())


def test_read_corpus_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("one\ntwo\none\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text('id,text\n1,"x, y"\n2,z\n', encoding="utf-8")
    (tmp_path / "c.tsv").write_text("sent0\tsent1\thard_neg_1\nA\tB\tC\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "j1"}\n\n{"sent0": "j2", "sent1": "j3"}\n', encoding="utf-8")
    assert read_corpus(tmp_path / "c.txt") == ["one", "two"]
    assert read_corpus(tmp_path / "c.csv") == ["x, y", "z"]
    assert read_corpus(tmp_path / "c.tsv") == ["A", "B", "C"]
    assert read_corpus(tmp_path / "c.jsonl") == ["j1", "j2", "j3"]
    (tmp_path / "bad.csv").write_text("text\nok\n\"  \"\n", encoding="utf-8")
    with pytest.raises(PromcseError, match=r"bad\.csv, line 3, column text"):
        read_corpus(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"label": 1}\n', encoding="utf-8")
    with pytest.raises(PromcseError, match=r"bad\.jsonl, line 2: no sentence column"):
        read_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "c.xml").write_bytes(b"")
    with pytest.raises(PromcseError, match="unknown corpus file type"):
        read_corpus(tmp_path / "c.xml")


# ---- the command line, with the tiny random BERT -------------------------------------------------------

def write_pairs_csv(path: Path, n: int = 24) -> Path:
    sents = make_sentences(3 * n, seed=5)
    lines = ["sent0,sent1"] + [f"{sents[i]},{sents[n + i]}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_mines_writes_the_training_format_and_reports(tiny_bert: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from promcse.models.loading import load

    pairs_path = write_pairs_csv(tmp_path / "pairs.csv")
    out = tmp_path / "mined.csv"
    code = main(["mine", "--model", str(tiny_bert), "--input", str(pairs_path), "--output", str(out),
                 "--range", "2-10", "--margin", "0.001", "--per-anchor", "2", "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "rows in" in captured.out and "dropped by --margin 0.001" in captured.out and str(out) in captured.out
    back = read_training_file(out)
    pairs = read_training_file(pairs_path)
    api = mine_hard_negatives(load(str(tiny_bert), device="cpu"), pairs, None,
                              MineConfig(range_min=2, range_max=10, margin=0.001, per_anchor=2))
    assert out.read_text(encoding="utf-8") == api.to_csv() and back.anchor == api.anchor
    assert out.read_text(encoding="utf-8").splitlines()[0] == "sent0,sent1,hard_neg_1,hard_neg_2"


def test_cli_bad_range_is_one_line_and_exit_2(tiny_bert: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pairs_path = write_pairs_csv(tmp_path / "pairs.csv")
    code = main(["mine", "--model", str(tiny_bert), "--input", str(pairs_path), "--output",
                 str(tmp_path / "o.csv"), "--range", "50-10"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--range 50-10" in err
    assert not (tmp_path / "o.csv").exists()


def test_cli_bad_input_names_the_file_and_line(tiny_bert: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cases = {"short.csv": ("sent0,sent1\na dog runs,a dog is running\na cat sleeps\n", "line 3"),
             "short.jsonl": ('{"sent0": "a", "sent1": "b"}\n{"sent0": "c"}\n', "line 2, column sent1"),
             "empty.csv": ("", "empty file"),
             "empty.txt": ("", "empty")}
    for name, (text, where) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        code = main(["mine", "--model", str(tiny_bert), "--input", str(tmp_path / name), "--output",
                     str(tmp_path / "o.csv")])
        err = capsys.readouterr().err
        assert code == 2 and name in err and where in err and len(err.strip().splitlines()) == 1, err
    code = main(["mine", "--input", str(tmp_path / "short.csv"), "--output", str(tmp_path / "short.csv")])
    assert code == 2 and "overwrite an input" in capsys.readouterr().err
    code = main(["mine", "--input", "bundled:nope.csv", "--output", str(tmp_path / "o.csv")])
    assert code == 2 and "no bundled file 'nope.csv'" in capsys.readouterr().err


def test_cli_too_many_negatives_for_the_range_is_refused(tiny_bert: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pairs_path = write_pairs_csv(tmp_path / "pairs.csv", n=4)
    code = main(["mine", "--model", str(tiny_bert), "--input", str(pairs_path), "--output", str(tmp_path / "o.csv"),
                 "--range", "1-3", "--per-anchor", "5"])
    assert code == 2 and "error: --per-anchor: 5 negatives per row" in capsys.readouterr().err
    code = main(["mine", "--model", str(tiny_bert), "--input", str(pairs_path), "--output", str(tmp_path / "o.csv"),
                 "--range", "1-20", "--per-anchor", "10", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err  # 8 sentences: no anchor has 10 candidates
    assert code == 2 and "no row got 10 negative(s): all 4 rows were dropped" in err
    assert not (tmp_path / "o.csv").exists()
