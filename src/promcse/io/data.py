"""Readers for every input file promcse takes, and the training batch type.

All readers live here so that every bad-input error names the file, line and column in the same way
(:class:`promcse.errors.PromcseError`). Readers decode strictly as UTF-8 (a leading BOM is accepted),
accept LF and CRLF line ends, and never silently skip malformed rows.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from promcse.errors import PromcseError
from promcse.io.jsonl import iter_jsonl

PAIR_COLUMNS: tuple[str, ...] = ("sent0", "sent1")
HARD_NEG_COLUMN = "hard_neg"
LABEL_COLUMN = "label"  # class label per row, for loss.name=supcon


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores (one STS file).

    Attributes:
        name: Name to report the file under (file stem).
        sentence1: First sentences.
        sentence2: Second sentences.
        scores: Gold scores, finite floats.
    """

    name: str
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class TrainExamples:
    """Training examples as named views; ``positive`` is None for unsupervised (dropout) views.

    Attributes:
        anchor: Anchor sentences.
        positive: Positive sentences (None: the anchor itself, seen through a second dropout mask).
        negatives: Hard-negative columns (``hard_neg``, then ``hard_neg_1..k``), each aligned row by row
            with ``anchor``; empty when the data has none.
        source: File they came from, for messages.
        labels, label_names: Each row's class id (``label`` column; None without one); the labels as written.
    """

    anchor: list[str]
    positive: list[str] | None
    negatives: tuple[list[str], ...]
    source: str
    labels: tuple[int, ...] | None = None
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def negative(self) -> list[str] | None:
        """The first hard-negative column (None when absent)."""
        return self.negatives[0] if self.negatives else None

    @property
    def has_hard_negatives(self) -> bool:
        """True when every anchor has at least one paired hard negative."""
        return bool(self.negatives)

    def views(self, rows: np.ndarray) -> list[list[str]]:
        """The views of the batch ``rows`` (:func:`batch_views`)."""
        return batch_views(self, rows)

    def is_contrastive(self, rows: np.ndarray) -> bool:
        """Whether the batch takes the contrastive term (always, for one file)."""
        return True

    def labels_of(self, rows: np.ndarray) -> np.ndarray | None:
        """The class ids of the batch ``rows`` (None when the file has no ``label`` column)."""
        return None if self.labels is None else np.asarray([self.labels[i] for i in rows], dtype=np.int64)

    def texts(self) -> list[str]:
        """Every text of every view, in column order (with repeats)."""
        views = [self.anchor, self.positive or [], *self.negatives]
        return [text for view in views for text in view]


def read_text(path: str | Path) -> str:
    """Read a whole file as strict UTF-8 text with a leading BOM removed.

    Raises:
        PromcseError: Missing file, or bytes that are not UTF-8 (the byte offset and line are named).
    """
    p = Path(path)
    if not p.is_file():
        raise PromcseError("file not found" if not p.exists() else "not a regular file", path=p)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PromcseError(
            f"not valid UTF-8: byte 0x{raw[err.start]:02x} at byte offset {err.start}", path=p, line=line
        ) from None
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    """Split text into lines, accepting LF and CRLF, without a trailing empty line."""
    return text.replace("\r\n", "\n").split("\n") if text else []


def read_sentences(path: str | Path) -> TrainExamples:
    """Read an unsupervised training file: one sentence per line.

    Raises:
        PromcseError: Empty or whitespace-only lines (the line is named), or an empty file.
    """
    lines = _lines(read_text(path))
    if lines and lines[-1] == "":
        lines.pop()
    sentences: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise PromcseError("empty or whitespace-only sentence", path=path, line=number)
        sentences.append(line.strip())
    if not sentences:
        raise PromcseError("no sentences: the file is empty", path=path)
    return TrainExamples(anchor=sentences, positive=None, negatives=(), source=str(path))


def _rows_from_delimited(path: str | Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Parse CSV/TSV text into a header and (line number, fields) rows."""
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if header is None:
                header = [f.strip() for f in fields]
                continue
            if not fields or fields == [""]:
                continue  # blank line between rows
            rows.append((reader.line_num, fields))
    except csv.Error as err:
        raise PromcseError(f"malformed row: {err}", path=path, line=reader.line_num) from None
    if header is None:
        raise PromcseError("empty file: expected a header row", path=path)
    return header, rows


def jsonl_rows(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, object]]]]:
    """(line number, object) rows of a JSON Lines file (:func:`promcse.io.jsonl.iter_jsonl`) and the union of their keys."""
    rows: list[tuple[int, dict[str, object]]] = list(iter_jsonl(path))
    return sorted({k for _, obj in rows for k in obj}), rows


def _require_columns(path: str | Path, header: list[str], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise PromcseError(
            f"missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}", path=path, line=1
        )
    dupes = sorted({c for c in header if header.count(c) > 1 and c})
    if dupes:
        raise PromcseError(f"duplicate column(s) in header: {', '.join(dupes)}", path=path, line=1)


def _field(path: str | Path, number: int, row: dict[str, object], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise PromcseError("missing or non-text value", path=path, line=number, column=column)
    if not value.strip():
        raise PromcseError("empty or whitespace-only text", path=path, line=number, column=column)
    return value.strip()


def negative_columns(path: str | Path, header: list[str]) -> list[str]:
    """The hard-negative columns of a header: ``hard_neg`` if present, then ``hard_neg_1, hard_neg_2, ...``.

    Raises:
        PromcseError: Numbered columns with a gap (e.g. ``hard_neg_1, hard_neg_3``).
    """
    numbered = sorted(int(c[len(HARD_NEG_COLUMN) + 1:]) for c in header
                      if c.startswith(HARD_NEG_COLUMN + "_") and c[len(HARD_NEG_COLUMN) + 1:].isdigit())
    if numbered != list(range(1, len(numbered) + 1)):
        missing = min(set(range(1, max(numbered) + 1)) - set(numbered))
        raise PromcseError(f"hard-negative columns must be numbered hard_neg_1..hard_neg_k without gaps; "
                           f"{HARD_NEG_COLUMN}_{missing} is missing", path=path, line=1)
    plain = [HARD_NEG_COLUMN] if HARD_NEG_COLUMN in header else []
    return plain + [f"{HARD_NEG_COLUMN}_{n}" for n in numbered]


def read_pairs(path: str | Path, *, require_hard_negatives: bool = False) -> TrainExamples:
    """Read supervised training pairs/triplets with named columns ``sent0, sent1[, hard_neg][, hard_neg_1..k]``,
    or labelled rows ``sent0[, sent1], label`` (SupCon; without ``sent1`` the positive is a dropout view).

    The format follows the extension: ``.csv`` (quoted CSV), ``.tsv`` (tab-separated, no quoting),
    ``.jsonl``/``.json`` (one object per line). Columns are found by name, never by position.

    Raises:
        PromcseError: Missing columns, wrong field counts, empty text, or an empty dataset.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        header, dict_rows = jsonl_rows(path)
    elif suffix in (".csv", ".tsv"):
        header, raw_rows = _rows_from_delimited(path, read_text(path), "," if suffix == ".csv" else "\t")
        dict_rows = []
        for number, fields in raw_rows:
            if len(fields) != len(header):
                raise PromcseError(
                    f"expected {len(header)} fields like the header, found {len(fields)}", path=path, line=number
                )
            dict_rows.append((number, dict(zip(header, fields))))
    else:
        raise PromcseError("unknown training file type: use .txt, .csv, .tsv or .jsonl", path=path)
    return examples_from_rows(path, header, dict_rows, require_hard_negatives=require_hard_negatives)


def examples_from_rows(path: str | Path, header: list[str], dict_rows: list[tuple[int, dict[str, object]]], *,
                       require_hard_negatives: bool = False, unsupervised_ok: bool = False) -> TrainExamples:
    """Training examples from named rows (``(line, {column: value})``), checked as :func:`read_pairs` checks a
    file; with ``unsupervised_ok`` a ``sent0``-only table is unsupervised (dropout views, like a ``.txt``)."""
    if unsupervised_ok and header == ["sent0"] and not require_hard_negatives:
        if not dict_rows:
            raise PromcseError("no training rows", path=path)
        return TrainExamples([_field(path, n, row, "sent0") for n, row in dict_rows], None, (), source=str(path))
    labelled = LABEL_COLUMN in header
    has_positive = "sent1" in header or not labelled
    _require_columns(path, header, PAIR_COLUMNS if has_positive else PAIR_COLUMNS[:1])
    neg_columns = negative_columns(path, header)
    if require_hard_negatives and not neg_columns:
        _require_columns(path, header, PAIR_COLUMNS + (HARD_NEG_COLUMN,))
    anchor, positive, label_texts = [], [], []
    negatives: tuple[list[str], ...] = tuple([] for _ in neg_columns)
    for number, row in dict_rows:
        anchor.append(_field(path, number, row, "sent0"))
        if has_positive:
            positive.append(_field(path, number, row, "sent1"))
        if labelled:
            label_texts.append(_label(path, number, row))
        for column, values in zip(neg_columns, negatives):
            values.append(_field(path, number, row, column))
    if not anchor:
        raise PromcseError("no training rows: the file has only a header", path=path)
    ids = {name: i for i, name in enumerate(dict.fromkeys(label_texts))}  # class ids by first appearance
    return TrainExamples(anchor, positive if has_positive else None, negatives, source=str(path),
                         labels=tuple(ids[t] for t in label_texts) if labelled else None, label_names=tuple(ids))


def _label(path: str | Path, number: int, row: dict[str, object]) -> str:
    """A row's class label as text: a non-empty string, or an integer in JSONL (``true``/``1.5`` are refused)."""
    value = row.get(LABEL_COLUMN)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise PromcseError("missing or empty label (a class name or integer)", path=path, line=number, column=LABEL_COLUMN)


def read_training_file(path: str | Path, *, require_hard_negatives: bool = False) -> TrainExamples:
    """Read any training file: ``.txt`` is unsupervised, other extensions are pairs/triplets."""
    if Path(path).suffix.lower() == ".txt":
        if require_hard_negatives:
            raise PromcseError("the loss needs hard negatives, but a .txt file has only sentences", path=path)
        return read_sentences(path)
    return read_pairs(path, require_hard_negatives=require_hard_negatives)


BUNDLED = "bundled:"


def bundled_path(name: str) -> Path:
    """Path of a data file shipped inside the package (``resources/data/train/NAME``)."""
    path = Path(str(resources.files("promcse") / "resources" / "data" / "train" / name))
    if not path.is_file():
        available = sorted(p.name for p in path.parent.iterdir())
        raise PromcseError(f"no bundled file '{name}'; available: {', '.join(available)}", key="data.train_file")
    return path


def resolve_train_file(name: str) -> Path:
    """Map ``bundled:NAME`` to the packaged file; leave other paths as given."""
    return bundled_path(name[len(BUNDLED):]) if name.startswith(BUNDLED) else Path(name)


def batch_order(n_rows: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Shuffled row indices per step over all epochs; a last batch of < 2 rows is dropped.

    A pure function of its arguments, so a resumed run finds its place from the step number alone.
    """
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    for _ in range(epochs):
        perm = rng.permutation(n_rows)
        batches.extend(perm[i : i + batch_size] for i in range(0, n_rows, batch_size))
        if len(batches[-1]) < 2:
            batches.pop()
    return batches


def batch_views(examples: TrainExamples, rows: np.ndarray) -> list[list[str]]:
    """The views of a batch: [anchor, positive, negative_1, ..., negative_k]; unsupervised positives are the anchors."""
    anchor = [examples.anchor[i] for i in rows]
    positive = anchor if examples.positive is None else [examples.positive[i] for i in rows]
    return [anchor, positive] + [[column[i] for i in rows] for column in examples.negatives]


def _parse_score(path: str | Path, number: int, value: str) -> float | None:
    """Parse a gold score; empty means 'no gold' (dropped, as SentEval does)."""
    if not value.strip():
        return None
    try:
        score = float(value)
    except ValueError:
        raise PromcseError(f"score is not a number: {value!r}", path=path, line=number, column="score") from None
    if not math.isfinite(score):
        raise PromcseError(f"score is not finite: {value!r}", path=path, line=number, column="score")
    return score


def read_sts_tsv(path: str | Path, *, min_rows: int = 3) -> StsPairs:
    """Read an STS file: header ``sentence1<TAB>sentence2<TAB>score``; extra columns are ignored.

    Split on tabs with no quoting (the shared data's convention). Rows with an empty score are dropped,
    as SentEval drops pairs without gold.

    Raises:
        PromcseError: Missing columns, short rows, non-numeric or NaN scores, or fewer than ``min_rows`` pairs.
    """
    lines = _lines(read_text(path))
    if not lines or not lines[0].strip():
        raise PromcseError("empty file: expected the header sentence1<TAB>sentence2<TAB>score", path=path)
    header = [h.strip() for h in lines[0].split("\t")]
    _require_columns(path, header, ("sentence1", "sentence2", "score"))
    i1, i2, iscore = header.index("sentence1"), header.index("sentence2"), header.index("score")
    s1, s2, scores = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(header):
            raise PromcseError(
                f"expected {len(header)} tab-separated fields, found {len(fields)}", path=path, line=number
            )
        score = _parse_score(path, number, fields[iscore])
        if score is None:
            continue
        s1.append(fields[i1])
        s2.append(fields[i2])
        scores.append(score)
    if len(scores) < min_rows:
        raise PromcseError(f"only {len(scores)} scored pair(s); at least {min_rows} are needed", path=path)
    return StsPairs(Path(path).stem, s1, s2, scores)


def read_table(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a table with a header row: quoted CSV (``.csv``) or unquoted TSV (any other extension).

    Blank lines are skipped; header names are stripped of surrounding whitespace.

    Returns:
        The header and the data rows as (line number, {column: value}); both empty for an empty file.

    Raises:
        PromcseError: A malformed CSV row, or a row whose field count differs from the header's (line named).
    """
    p = Path(path)
    tsv = p.suffix.lower() != ".csv"
    reader = csv.reader(io.StringIO(read_text(p), newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    try:
        records = [(reader.line_num, fields) for fields in reader if fields]
    except csv.Error as err:
        raise PromcseError(f"malformed row: {err}", path=p, line=reader.line_num) from None
    header = [h.strip() for h in records[0][1]] if records else []
    for line, fields in records[1:]:
        if len(fields) != len(header):
            raise PromcseError(f"{len(fields)} fields, but the header has {len(header)}", path=p, line=line)
    return header, [(line, dict(zip(header, fields))) for line, fields in records[1:]]
