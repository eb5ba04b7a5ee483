"""Pluggable model selection in ``promcse train``: ``data.dev`` (STS-B dev or retrieval dev nDCG@10) and a user
``evaluator`` function; the kept checkpoint is the best step by that score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promcse.errors import PromcseError
from promcse.training.config import load_config, validate
from promcse.training.train import train
from test_query_side import tiny_folder
from test_train import tiny_config


def test_user_evaluator_selects_the_checkpoint(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    scores = iter([1.0, 5.0, 2.0])  # steps 2, 4, 6: step 4 is best
    calls: list[int] = []

    def evaluator(encoder: object) -> float:
        calls.append(1)
        return next(scores)

    config = tiny_config(tiny_bert, tiny_data, "train.max_steps=6")
    result = train(config, tmp_path / "run", show_progress=False, evaluator=evaluator)
    assert len(calls) == 3 and result.best_dev == 5.0 and result.best_step == 4
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["dev"] == 5.0 and meta["step"] == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dev"] for r in logged if "dev" in r] == [1.0, 5.0, 2.0]


def test_retrieval_dev_scores_ndcg_on_a_beir_split(tiny_bert: Path, tiny_data: dict[str, Path],
                                                   tmp_path: Path) -> None:
    from promcse.evaluation.retrieval import evaluate_encoder
    from promcse.models.loading import load

    folder = tiny_folder(tmp_path / "beir")
    config = tiny_config(tiny_bert, tiny_data, f"data.dev=retrieval:{folder}:test", "train.max_steps=2")
    result = train(config, tmp_path / "run", show_progress=False)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    saved = load(str(tmp_path / "run"), device="cpu")
    again = evaluate_encoder(saved, folder, "test", max_length=config.data.max_length, cache=False,
                             show_progress=False)["metrics"]["ndcg@10"]
    assert meta["retrieval_dev_ndcg@10"] == pytest.approx(again, abs=1e-6) == pytest.approx(result.best_dev)


@pytest.mark.parametrize("value", ["sts", "retrieval:", "retrieval"])
def test_bad_dev_value_is_refused_by_key(value: str) -> None:
    with pytest.raises(PromcseError, match="data.dev"):
        validate(load_config(None, [f"data.dev={value}"]))
