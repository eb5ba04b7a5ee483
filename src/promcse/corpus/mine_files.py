"""The miner's files (:mod:`promcse.corpus.mine`): the ``--corpus`` reader, the atomic writer and the report.

A corpus file is ``.txt`` (one sentence a line), or ``.csv``/``.tsv``/``.jsonl`` with a ``text`` column, else
every training column (``sent0``, ``sent1``, ``hard_neg``, ``hard_neg_N``). The mined rows are written as
quoted CSV or JSON Lines through :func:`promcse.io.files.atomic_write_text`, readable by
:func:`promcse.io.data.read_training_file`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from promcse.io.corpus_files import iter_corpus
from promcse.errors import PromcseError
from promcse.io.files import atomic_write_text, check_output_file
from promcse.corpus.mine import MinedResult

SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")


def check_mined_output(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any file is read or model loaded, an output :func:`write_mined` could not write.

    Refused: another suffix than ``.csv``/``.jsonl``; an existing directory, FIFO or device; a path under a
    regular file; a place where no file can be created; one of ``inputs`` (the pairs, the corpus).

    Raises:
        PromcseError: Naming ``path`` (key ``path``) and the reason.
    """
    out = Path(path)
    if out.suffix.lower() not in SUFFIXES:
        raise PromcseError("must end in .csv or .jsonl", path=out, key="path")
    return check_output_file(out, inputs, label="path")


def read_corpus(path: str | Path) -> list[str]:
    """Corpus sentences (:func:`promcse.io.corpus_files.iter_corpus`: a ``text`` field, else every training
    column ``sent0``/``sent1``/``hard_neg``/``hard_neg_N``), distinct, in first-seen order.

    Raises:
        PromcseError: Unknown type, no sentence column, an empty cell, invalid JSON, or no sentences
            (file, line and column named).
    """
    texts = list(dict.fromkeys(text for _, text in iter_corpus(path, training_columns=True)))
    if not texts:
        raise PromcseError("no sentences in the corpus file", path=path)
    return texts


def write_mined(result: MinedResult, path: str | Path) -> Path:
    """Write the rows atomically as ``.csv`` (quoted) or ``.jsonl``; returns the path.

    Raises:
        PromcseError: No rows to write (the counts say why), or an output :func:`check_mined_output` refuses.
    """
    out = check_mined_output(path)
    suffix = out.suffix.lower()
    if not len(result):
        s = result.stats
        raise PromcseError(f"no row got {result.config.per_anchor} negative(s): all {s.rows_in} rows were "
                           f"dropped ({s.in_range} candidates in range, {s.dropped_margin + s.dropped_max_score} "
                           f"filtered); widen range_min..range_max, lower per_anchor, loosen the filter or add a "
                           "corpus",
                           path=out)
    atomic_write_text(out, result.to_csv() if suffix == ".csv" else result.to_jsonl())
    return out


def format_report(result: MinedResult, output: str | Path | None = None) -> str:
    """A readable summary: rows in and out, what each filter dropped, and mean positive vs negative scores."""
    s, c = result.stats, result.config
    rows = [("rows in", f"{s.rows_in:,}  ({s.anchors:,} distinct anchors, corpus of {s.corpus:,} sentences)"),
            ("rows out", f"{s.rows_out:,}"),
            ("skipped: the anchor or its positive", f"{s.skipped:,}"),
            (f"candidates at ranks {c.range_min}-{c.range_max}", f"{s.in_range:,}")]
    if c.margin is not None:
        rows.append((f"  dropped by --margin {c.margin:g}", f"{s.dropped_margin:,}  (score > positive - {c.margin:g})"))
    if c.max_score is not None:
        rows.append((f"  dropped by --max-score {c.max_score:g}",
                     f"{s.dropped_max_score:,}  (score > {c.max_score:g} x positive)"))
    rows.append((f"rows dropped: fewer than {c.per_anchor} negative(s)", f"{s.rows_short:,}"))
    positive = "1 (each sentence is its own positive)" if result.unsupervised else f"{s.positive_mean:.4f}"
    rows.append(("mean cosine of positives", positive))
    rows.append(("mean cosine of chosen negatives", f"{s.negative_mean:.4f}"))
    width = max(len(label) for label, _ in rows)
    lines = [f"mined hard negatives ({c.describe()})", *(f"  {label:<{width}}  {value}" for label, value in rows)]
    if output is not None:
        lines.append(f"wrote {s.rows_out:,} rows to {output} ({','.join(result.columns)})")
    return "\n".join(lines)
