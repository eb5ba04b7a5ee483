"""``train.report_to=mlflow``: one MLflow run per training run in an offline file store (``<output>/mlruns`` unless
``MLFLOW_TRACKING_URI``), holding the run config as params, step metrics, the best dev score and the run's end
(FINISHED, FAILED, KILLED); without mlflow installed, a message naming the extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from promcse.errors import PromcseError
from promcse.training.callbacks import Callback, MLflowLogger, flat_params, metric_name, reporters
from promcse.training.config import validate
from promcse.training.train import train
from test_train import tiny_config

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracking settings from the environment; set-then-delete so that whatever the run sets is undone."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def only_run(uri: str, experiment: str = "promcse"):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_mlflow_and_tensorboard_log_the_same_run(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny_config(tiny_bert, tiny_data, "train.report_to=tensorboard,mlflow"), out, show_progress=False)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    client, run = only_run((out / "mlruns").resolve().as_uri())
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.lr"] == "0.05" and params["model.prompt_length"] == "4"
    assert params["train.report_to"] == "tensorboard,mlflow" and params["data.sources"] == "[]"
    assert steps_of(client, run.info.run_id, "loss") == [1, 2, 3, 4]
    assert steps_of(client, run.info.run_id, "lr") == [1, 2, 3, 4]
    dev = client.get_metric_history(run.info.run_id, "stsb_dev")
    assert [m.step for m in dev] == [2, 4] and [m.value for m in dev] == [score for _, score in result.history]
    assert run.data.metrics["best_stsb_dev"] == pytest.approx(result.best_dev)
    assert run.data.tags["promcse.best_step"] == str(result.best_step)
    assert run.data.tags["promcse.best_checkpoint"] == str(out.resolve())


class Boom(Callback):
    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if step == 2:
            raise RuntimeError("boom")


def test_a_run_that_raises_ends_failed_in_the_configured_store(tiny_bert: Path, tiny_data: dict[str, Path],
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = (tmp_path / "store").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "custom")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store the user names needs the user's opt-in
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(tiny_bert, tiny_data, "train.report_to=mlflow"), tmp_path / "run", show_progress=False,
              callbacks=[Boom()])
    assert not (tmp_path / "run" / "mlruns").exists()
    client, run = only_run(store, "custom")
    assert run.info.status == "FAILED"
    assert steps_of(client, run.info.run_id, "loss") == [1, 2]  # the trackers log before the caller's callbacks


def test_an_interrupt_ends_the_run_killed_and_each_hook_once(tmp_path: Path) -> None:
    logger = MLflowLogger(tmp_path, {"train": {"lr": 0.1}})
    logger.on_step(1, {"loss": 2.0, "lr": 0.1})
    logger.on_error(1, KeyboardInterrupt())
    logger.on_end(1)  # already ended: the status stays
    client, run = only_run((tmp_path / "mlruns").resolve().as_uri())
    assert run.info.status == "KILLED" and run.data.params == {"train.lr": "0.1"}


def test_without_mlflow_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [m for m in list(sys.modules) if m == "mlflow" or m.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(PromcseError) as err:
        reporters("tensorboard,mlflow", tmp_path)
    assert err.value.key == "train.report_to" and "promcse[track]" in str(err.value)
    assert not (tmp_path / "mlruns").exists()


def test_report_to_takes_mlflow_with_tensorboard(tiny_bert: Path, tiny_data: dict[str, Path]) -> None:
    validate(tiny_config(tiny_bert, tiny_data, "train.report_to=tensorboard, mlflow"))
    with pytest.raises(PromcseError) as err:
        validate(tiny_config(tiny_bert, tiny_data, "train.report_to=mlflow,wandb"))
    assert err.value.key == "train.report_to"


def test_params_are_flat_and_metric_names_valid() -> None:
    config = {"data": {"sources": [{"path": "a.csv", "weight": 2}], "dev": "stsb"}, "train": {"lr": 0.01,
                                                                                             "report_to": ""}}
    assert flat_params(config) == {"data.sources": '[{"path": "a.csv", "weight": 2}]', "data.dev": "stsb",
                                   "train.lr": "0.01", "train.report_to": ""}
    assert len(flat_params({"a": "x" * 10_000})["a"]) == 6000
    assert metric_name("retrieval_dev_ndcg@10") == "retrieval_dev_ndcg_at_10"
    assert metric_name("loss") == "loss" and metric_name("a+b/c") == "a_b/c"
