"""The one JSON Lines reader and the one corpus reader: strict, streamed, every error naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from promcse.errors import PromcseError
from promcse.io.corpus_files import iter_corpus
from promcse.io.data import read_training_file
from promcse.io.jsonl import MAX_DEPTH, MAX_INT_DIGITS, iter_jsonl


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_rows_blank_lines_and_separators_inside_strings(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", '\ufeff{"text": "a\u2028b"}\n\n{"text": "c"}\r\n')
    assert list(iter_jsonl(f)) == [(1, {"text": "a\u2028b"}), (3, {"text": "c"})]


@pytest.mark.parametrize("line, message", [
    ("[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5), "nested deeper"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper"),  # json's own RecursionError, caught
    ('{"id": ' + "9" * 5000 + "}", "digits"),
    ('{"id": ' + "9" * (MAX_INT_DIGITS + 1) + "}", "digits"),
    ('{"x": NaN}', "NaN is not JSON"),
    ('{"x": -Infinity}', "Infinity is not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"x": ', "invalid JSON"),
])
def test_hostile_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = write(tmp_path / "bad.jsonl", '{"ok": 1}\n' + line + "\n")
    with pytest.raises(PromcseError, match=message) as info:
        list(iter_jsonl(f))
    assert info.value.line == 2 and info.value.path == str(f)


def test_invalid_utf8_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(PromcseError, match="not valid UTF-8") as info:
        list(iter_jsonl(write(tmp_path / "b.jsonl", b'{"a": 1}\n{"a": "\xff"}\n')))
    assert info.value.line == 2
    with pytest.raises(PromcseError, match="file not found"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(PromcseError, match="not a regular file"):
        list(iter_jsonl(tmp_path))


def test_training_files_read_jsonl_through_the_same_reader(tmp_path: Path) -> None:
    f = write(tmp_path / "t.jsonl", '{"sent0": "a", "sent1": "b"}\n{"sent0": "c", "sent1": [[[[' + "]]]]}\n")
    with pytest.raises(PromcseError) as info:
        read_training_file(f)
    assert info.value.line == 2
    deep = write(tmp_path / "d.jsonl", '{"sent0": "a", "sent1": ' + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(PromcseError, match="nested deeper"):
        read_training_file(deep)


def test_corpus_formats_stream_the_same_texts(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "one\ntwo\n")
    write(tmp_path / "b.jsonl", '{"text": "three", "id": "x"}\n')
    write(tmp_path / "c.csv", 'id,text\ny,"four, five"\n')
    write(tmp_path / "d.tsv", "text\tid\nsix\tz\n")
    assert [t for _, t in iter_corpus(tmp_path)] == ["one", "two", "three", "four, five", "six"]
    assert [i for i, _ in iter_corpus(tmp_path / "b.jsonl", id_field="id")] == ["x"]
    assert list(iter_corpus(tmp_path / "c.csv", id_field="id")) == [("y", "four, five")]


def test_training_columns_mode_and_row_errors(tmp_path: Path) -> None:
    f = write(tmp_path / "t.jsonl", '{"sent1": "b", "sent0": "a", "hard_neg": "c"}\n')
    assert [t for _, t in iter_corpus(f, training_columns=True)] == ["c", "a", "b"]  # sorted keys
    with pytest.raises(PromcseError, match="no sentence column"):
        list(iter_corpus(write(tmp_path / "u.jsonl", '{"other": "a"}\n'), training_columns=True))
    with pytest.raises(PromcseError, match="empty or whitespace-only") as info:
        list(iter_corpus(write(tmp_path / "e.csv", "text\nfine\n \n"), text_field="text"))
    assert info.value.line == 3
    with pytest.raises(PromcseError, match="unknown corpus file type"):
        list(iter_corpus(write(tmp_path / "x.xml", "<a/>")))


@pytest.mark.parametrize("text", ['{"a": ' + "[" * 5000 + "]" * 5000 + "}", '{"a": ' + "7" * 5000 + "}", '{"a": NaN}'])
def test_checkpoint_json_is_read_with_the_same_limits(tmp_path: Path, text: str) -> None:
    from promcse.io.schema import read_json_object

    with pytest.raises(PromcseError, match="config.json: (invalid JSON|JSON nested deeper|integer)") as info:
        read_json_object(write(tmp_path / "config.json", text))
    assert info.value.path == str(tmp_path / "config.json")
    assert "JSON: invalid JSON" not in str(info.value)  # one prefix, not two


def test_result_json_is_strict_json_with_nan_as_null() -> None:
    import json as json_mod

    from promcse.io.json_fields import dumps_strict

    text = dumps_strict({"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": "x", "e": 2})
    assert json_mod.loads(text) == {"a": None, "b": [1.5, None, {"c": None}], "d": "x", "e": 2}
    assert "NaN" not in text and "Infinity" not in text
