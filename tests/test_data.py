"""Readers: good files parse; every kind of bad input raises PromcseError naming file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promcse.io.data import batch_views, read_pairs, read_sentences, read_sts_tsv, read_training_file
from promcse.errors import PromcseError


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def test_sentences_accept_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, "s.txt", b"\xef\xbb\xbfone sentence\r\ntwo sentence\r\n")
    assert read_sentences(path).anchor == ["one sentence", "two sentence"]


def test_pairs_by_column_name_not_position(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", 'hard_neg,sent1,sent0\nN,"P, with comma",A\n')
    ex = read_pairs(path)
    assert (ex.anchor, ex.positive, ex.negative) == (["A"], ["P, with comma"], ["N"])


def test_pairs_tsv_and_jsonl(tmp_path: Path) -> None:
    tsv = read_pairs(write(tmp_path, "p.tsv", "sent0\tsent1\na\tb\n"))
    assert tsv.positive == ["b"] and tsv.negative is None
    jsonl = read_pairs(write(tmp_path, "p.jsonl", '{"sent0": "a", "sent1": "b", "hard_neg": "c"}\n'))
    assert jsonl.negative == ["c"]


@pytest.mark.parametrize(
    "name,data,match,line",
    [
        ("s.txt", "ok\n   \nok\n", "empty or whitespace-only", 2),
        ("s.txt", "", "empty", None),
        ("s.txt", b"ok\nbad \xff byte\n", "not valid UTF-8: byte 0xff at byte offset 7", 2),
        ("p.csv", "sent0,sent2\na,b\n", "missing column", 1),
        ("p.csv", "sent0,sent1\na,b,c\n", "expected 2 fields", 2),
        ("p.csv", "sent0,sent1\na, \n", "empty or whitespace-only text", 2),
        ("p.csv", "sent0,sent1\n", "only a header", None),
        ("p.jsonl", '{"sent0": "a"}\n', "missing column", 1),
        ("p.jsonl", '{"sent0": "a", "sent1": 3}\n', "non-text", 1),
        ("p.jsonl", "{bad json\n", "invalid JSON", 1),
        ("p.parquet", "x", "unknown training file type", None),
        ("sts.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\nc\td\t1\ne\tf\t2\n", "not finite", 2),
        ("sts.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\n", "not a number", 2),
        ("sts.tsv", "sentence1\tsentence2\na\tb\n", "missing column", 1),
        ("sts.tsv", "sentence1\tsentence2\tscore\na\tb\t1\n", "at least 3", None),
        ("sts.tsv", "sentence1\tsentence2\tscore\na\tb\n", "expected 3 tab-separated", 2),
        ("sts.tsv", "sentence1\tsentence2\tscore\tscore\na\tb\t1\t1\n", "duplicate column", 1),
    ],
)
def test_bad_inputs_name_file_and_line(tmp_path: Path, name: str, data: str | bytes, match: str, line: int | None) -> None:
    path = write(tmp_path, name, data)
    reader = read_sts_tsv if name.startswith("sts") else read_training_file
    with pytest.raises(PromcseError, match=match) as info:
        reader(path)
    assert info.value.path == str(path)
    assert info.value.line == line


def test_hard_negatives_required_for_eh(tmp_path: Path) -> None:
    with pytest.raises(PromcseError, match="missing column"):
        read_pairs(write(tmp_path, "p.csv", "sent0,sent1\na,b\n"), require_hard_negatives=True)
    with pytest.raises(PromcseError, match="hard negatives"):
        read_training_file(write(tmp_path, "s.txt", "a\n"), require_hard_negatives=True)


def test_sts_empty_gold_rows_are_dropped(tmp_path: Path) -> None:
    pairs = read_sts_tsv(write(tmp_path, "x.tsv", "sentence1\tsentence2\tscore\tsrc\na\tb\t1\tq\nc\td\t\tq\ne\tf\t2\tq\ng\th\t3\tq\n"))
    assert pairs.scores == [1.0, 2.0, 3.0] and pairs.sentence1 == ["a", "e", "g"]


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".txt", ".csv", ".tsv", ".jsonl"]))
def test_readers_parse_or_raise_promcse_error_on_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(data)
    for reader in (read_training_file, read_sts_tsv):
        try:
            reader(path)
        except PromcseError:
            pass


def test_numbered_hard_negative_columns_become_views(tmp_path):
    path = tmp_path / "mined.csv"
    path.write_text("sent0,sent1,hard_neg_1,hard_neg_2\na,b,c,d\ne,f,g,h\n", encoding="utf-8")
    ex = read_training_file(path, require_hard_negatives=True)
    assert ex.negatives == (["c", "g"], ["d", "h"]) and ex.negative == ["c", "g"]
    assert batch_views(ex, np.array([1, 0])) == [["e", "a"], ["f", "b"], ["g", "c"], ["h", "d"]]


def test_a_gap_in_numbered_negatives_is_named(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("sent0,sent1,hard_neg_1,hard_neg_3\na,b,c,d\n", encoding="utf-8")
    with pytest.raises(PromcseError, match="hard_neg_2 is missing"):
        read_training_file(path)
