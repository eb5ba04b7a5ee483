"""Training data from tables (datasets.Dataset, pandas DataFrame, dict of columns, list of rows): the same examples
as the training file with the same rows, the same checks and messages, and a training run on a Dataset with a
callback and a TensorBoard log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_sentences
from promcse.errors import PromcseError
from promcse.io.data import read_training_file
from promcse.io.tables import examples_from_table
from promcse.training.callbacks import Callback
from promcse.training.train import train
from test_train import tiny_config

SENTS = make_sentences(40, seed=9)
ROWS = [{"sent0": SENTS[i], "sent1": SENTS[(i + 1) % 40], "hard_neg": SENTS[(i + 5) % 40]} for i in range(40)]


def as_tables() -> dict[str, object]:
    import pandas as pd

    datasets = pytest.importorskip("datasets")
    columns = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    return {"dataset": datasets.Dataset.from_list(ROWS), "frame": pd.DataFrame(ROWS), "dict": columns, "list": ROWS}


def test_every_table_kind_gives_the_files_examples(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    want = read_training_file(path, require_hard_negatives=True)
    for name, table in as_tables().items():
        got = examples_from_table(table, require_hard_negatives=True)
        assert (got.anchor, got.positive, got.negatives) == (want.anchor, want.positive, want.negatives), name


def test_table_rows_are_checked_like_file_rows() -> None:
    import pandas as pd

    bad = [dict(r) for r in ROWS]
    bad[2]["sent1"] = "   "
    with pytest.raises(PromcseError, match="pandas DataFrame, line 3, column sent1: empty") as err:
        examples_from_table(pd.DataFrame(bad))
    assert err.value.line == 3
    with pytest.raises(PromcseError, match="missing or non-text"):
        examples_from_table(pd.DataFrame([{**ROWS[0], "sent1": None}, ROWS[1]]))
    with pytest.raises(PromcseError, match="missing column"):
        examples_from_table({"sent0": SENTS[:3], "other": SENTS[:3]})
    with pytest.raises(PromcseError, match="different lengths"):
        examples_from_table({"sent0": SENTS[:3], "sent1": SENTS[:2]})
    with pytest.raises(PromcseError, match="cannot train on a str") as err:
        examples_from_table("train.csv")
    assert err.value.key == "train_data"


def test_labels_from_pandas_integers_and_an_unsupervised_column() -> None:
    import pandas as pd

    labelled = examples_from_table(pd.DataFrame({"sent0": SENTS[:4], "label": [3, 1, 3, 2]}))
    assert labelled.labels == (0, 1, 0, 2) and labelled.positive is None
    unsupervised = examples_from_table({"sent0": SENTS[:5]})
    assert unsupervised.positive is None and unsupervised.anchor == [s.strip() for s in SENTS[:5]]


class Steps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.steps.append(step)


def test_train_on_a_dataset_with_a_callback_and_tensorboard(tiny_bert: Path, tiny_data: dict[str, Path],
                                                            tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dataset = as_tables()["dataset"]
    steps = Steps()
    config = tiny_config(tiny_bert, tiny_data, "train.report_to=tensorboard", "loss.name=nt_xent_eh")
    result = train(config, tmp_path / "run", show_progress=False, callbacks=[steps], train_data=dataset)
    assert steps.steps == [1, 2, 3, 4] and result.steps == 4
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train_rows"] == 40 and saved["run_config"]["data"]["train_file"] == "<datasets.Dataset: 40 rows>"
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 4
