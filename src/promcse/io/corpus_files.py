"""Corpus files: the one reader of documents to encode, index or mine.

A corpus is a ``.txt`` file (one text a line), ``.jsonl`` (one object a line, the text under ``text_field``, an
optional id under ``id_field``; read by :func:`promcse.io.jsonl.iter_jsonl`), ``.csv``/``.tsv`` (a header row,
the same fields as columns), ``.parquet`` (the same columns; needs pyarrow), or a directory of such files
(recursively, in path order, hidden ones skipped). Every row is checked as it streams by: an empty or
non-text text, a missing or non-scalar id, bytes that are not UTF-8 stop with the file, line and field named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError
from promcse.io.data import read_table
from promcse.io.jsonl import decoded_lines, iter_jsonl

SUFFIXES: dict[str, str] = {".txt": "txt", ".jsonl": "jsonl", ".csv": "table", ".tsv": "table", ".parquet": "parquet"}
PARQUET_BATCH = 4096
TRAINING_COLUMN = re.compile(r"^(sent0|sent1|hard_neg|hard_neg_\d+)$")


def corpus_files(path: str | Path) -> list[Path]:
    """The input files: ``path`` itself, or every known file under a directory (hidden ones skipped)."""
    root = Path(path)
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise PromcseError(f"unknown corpus file type: use {', '.join(SUFFIXES)}", path=root)
        return [root]
    if not root.is_dir():
        raise PromcseError("file not found", path=root)
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise PromcseError(f"no {', '.join(SUFFIXES)} files in the directory", path=root)
    return files


def _txt_rows(path: Path) -> Iterator[tuple[Any, str]]:
    for number, line in decoded_lines(path):
        if not line.strip():
            raise PromcseError("empty or whitespace-only text", path=path, line=number)
        yield None, line.strip()


def _check_text(value: Any, path: Path, line: int, field: str) -> str:
    if not isinstance(value, str):
        raise PromcseError(f"missing or non-text '{field}'", path=path, line=line, column=field)
    if not value.strip():
        raise PromcseError("empty or whitespace-only text", path=path, line=line, column=field)
    return value.strip()


def _check_id(value: Any, path: Path, line: int, field: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PromcseError(f"missing id '{field}' (ids are strings or integers)", path=path, line=line, column=field)
    return value


def _parquet_rows(path: Path, text_field: str, id_field: str | None) -> Iterator[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromcseError("reading .parquet needs pyarrow: pip install 'promcse[parquet]'", path=path) from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid/OSError types
        raise PromcseError(f"cannot read parquet: {err}", path=path) from None
    columns = [text_field] + ([id_field] if id_field else [])
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise PromcseError(f"missing column(s) {', '.join(missing)}; found {', '.join(table.schema_arrow.names)}",
                           path=path)
    number, batches = 0, table.iter_batches(batch_size=PARQUET_BATCH, columns=columns)
    while True:
        try:  # a damaged page or column chunk is found only when its batch is decoded
            batch = next(batches, None)
            if batch is None:
                break
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
        except Exception as err:  # pyarrow's ArrowInvalid/ArrowIOError/OSError, and whatever a codec raises
            raise PromcseError(f"cannot read parquet from this row on (rows are read {PARQUET_BATCH} at a time), "
                               f"damaged data: {type(err).__name__}: {str(err)[:200]}", path=path,
                               line=number + 1) from None
        for rid, text in zip(ids, texts):
            number += 1  # parquet rows are reported as lines, 1-based
            yield (_check_id(rid, path, number, id_field) if id_field else None,
                   _check_text(text, path, number, text_field))


def _object_rows(path: Path, rows: Iterable[tuple[int, dict[str, Any]]], text_field: str, id_field: str | None,
                 training_columns: bool) -> Iterator[tuple[Any, str]]:
    """Rows of JSON objects or table rows: the ``text_field``, or (``training_columns``) every training column."""
    for number, obj in rows:
        if training_columns and text_field not in obj:
            columns = [c for c in obj if TRAINING_COLUMN.match(c)]  # a table's header order; JSON: sorted keys
            if not columns:
                raise PromcseError(f"no sentence column: expected '{text_field}' or sent0/sent1/hard_neg; found "
                                   f"{', '.join(sorted(obj)) or 'none'}", path=path, line=number)
            for column in columns:
                yield None, _check_text(obj.get(column), path, number, column)
            continue
        rid = _check_id(obj.get(id_field), path, number, id_field) if id_field else None
        yield rid, _check_text(obj.get(text_field), path, number, text_field)


def _sorted_keys(rows: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSON objects with their keys in sorted order (JSON gives them no order of their own)."""
    for number, obj in rows:
        yield number, dict(sorted(obj.items()))


def _table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    header, rows = read_table(path)
    if not header:
        raise PromcseError("empty file: expected a header row", path=path)
    yield from rows


def iter_corpus(path: str | Path, text_field: str = "text", id_field: str | None = None,
                training_columns: bool = False) -> Iterator[tuple[Any, str]]:
    """Stream ``(id, text)`` over every input file in order (ids default to the 0-based row number).

    Args:
        path: A ``.txt``/``.jsonl``/``.csv``/``.tsv``/``.parquet`` file, or a directory of them.
        text_field: The text's key (JSON Lines), column (CSV/TSV, parquet).
        id_field: The id's key or column (default: the row number).
        training_columns: A row without ``text_field`` gives the texts of its training columns (``sent0``,
            ``sent1``, ``hard_neg``, ``hard_neg_N``), one row each (the miner reads training files as corpora).
    """
    row = 0
    for file in corpus_files(path):
        kind = SUFFIXES[file.suffix.lower()]
        if kind == "txt":
            rows = _txt_rows(file)
        elif kind == "parquet":
            rows = _parquet_rows(file, text_field, id_field)
        else:
            objects = _sorted_keys(iter_jsonl(file)) if kind == "jsonl" else _table_rows(file)
            rows = _object_rows(file, objects, text_field, id_field, training_columns)
        for rid, text in rows:
            yield (row if rid is None else rid), text
            row += 1
