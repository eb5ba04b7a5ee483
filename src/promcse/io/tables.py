"""Training data from in-memory tables: a ``datasets.Dataset``, a pandas ``DataFrame``, a dict of columns or a list
of row dicts, checked exactly as a training file is (:func:`promcse.io.data.examples_from_rows`)."""

from __future__ import annotations

from typing import Any

from promcse.errors import PromcseError
from promcse.io.data import TrainExamples, examples_from_rows


def _plain(value: Any) -> Any:
    """A numpy scalar (pandas and datasets hand them out) as the Python value; anything else as it is."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def examples_from_table(table: object, *, require_hard_negatives: bool = False) -> TrainExamples:
    """Training examples from a ``datasets.Dataset``, a pandas ``DataFrame``, a dict of columns or a list of row
    dicts, with the columns of a training file (``sent0``, ``sent1``, ``hard_neg``/``hard_neg_1..k``, ``label``; a
    ``sent0``-only table is unsupervised). Errors name the table and the 1-based row as the "line".
    """
    name, header, records = _table_records(table)
    rows = [(number, {k: _plain(v) for k, v in record.items()}) for number, record in enumerate(records, start=1)]
    return examples_from_rows(name, header, rows, require_hard_negatives=require_hard_negatives,
                              unsupervised_ok=True)


def _table_records(table: object) -> tuple[str, list[str], list[dict[str, object]]]:
    """(a name for messages, the column names, the rows as dicts) of any supported table."""
    if hasattr(table, "column_names") and hasattr(table, "to_list"):  # datasets.Dataset
        return "datasets.Dataset", list(table.column_names), list(table.to_list())  # type: ignore[attr-defined]
    if hasattr(table, "columns") and hasattr(table, "to_dict"):  # pandas.DataFrame
        header = [str(c) for c in table.columns]  # type: ignore[attr-defined]
        return "pandas DataFrame", header, table.to_dict("records")  # type: ignore[attr-defined]
    if isinstance(table, dict) and all(isinstance(v, list) for v in table.values()):
        lengths = {len(v) for v in table.values()}
        if len(lengths) > 1:
            raise PromcseError(f"columns of different lengths: {sorted(lengths)}", path="dict of columns")
        return "dict of columns", list(table), [dict(zip(table, values)) for values in zip(*table.values())]
    if isinstance(table, list) and all(isinstance(r, dict) for r in table):
        return "list of rows", sorted({k for r in table for k in r}), table
    raise PromcseError(f"cannot train on a {type(table).__name__}: give a datasets.Dataset, a pandas DataFrame, a "
                       "dict of columns or a list of row dicts", key="train_data")
