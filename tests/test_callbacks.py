"""The open training loop: callbacks see every step, evaluation and save; early stopping keeps the best
checkpoint; ``train.report_to=tensorboard`` writes event files that TensorBoard reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promcse.errors import PromcseError
from promcse.training.callbacks import Callback, EarlyStopping
from promcse.training.config import validate
from promcse.training.train import train
from test_train import tiny_config


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.events.append(("step", step, sorted(logs)))

    def on_evaluate(self, step: int, name: str, score: float) -> None:
        self.events.append(("evaluate", step, name))

    def on_save(self, step: int, path: Path) -> None:
        self.events.append(("save", step, path.name))

    def on_end(self, steps: int) -> None:
        self.events.append(("end", steps))


def test_callbacks_see_steps_evaluations_saves_and_the_end(tiny_bert: Path, tiny_data: dict[str, Path],
                                                         tmp_path: Path) -> None:
    scores = iter([1.0, 3.0])
    recorder = Recorder()
    train(tiny_config(tiny_bert, tiny_data), tmp_path / "run", show_progress=False, callbacks=[recorder],
          evaluator=lambda encoder: next(scores))
    steps = [e for e in recorder.events if e[0] == "step"]
    assert [e[1] for e in steps] == [1, 2, 3, 4] and all({"loss", "lr"} <= set(e[2]) for e in steps)
    rest = [e for e in recorder.events if e[0] != "step"]
    assert rest == [("evaluate", 2, "dev"), ("save", 2, "run"), ("evaluate", 4, "dev"), ("save", 4, "run"),
                    ("end", 4)]


def test_early_stopping_keeps_the_best_checkpoint(tiny_bert: Path, tiny_data: dict[str, Path],
                                                  tmp_path: Path) -> None:
    scores = iter([5.0, 4.0, 3.0, 9.0, 9.0, 9.0])
    config = tiny_config(tiny_bert, tiny_data, "train.max_steps=12", "train.early_stopping_patience=2")
    result = train(config, tmp_path / "run", show_progress=False, evaluator=lambda encoder: next(scores))
    assert result.steps == 6 and result.best_step == 2 and result.best_dev == 5.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 2


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    stop = EarlyStopping(2, min_delta=0.5)
    for step, score in enumerate([1.0, 1.4, 2.0, 2.2, 2.3], start=1):
        stop.on_evaluate(step, "dev", score)
    assert stop.should_stop() and stop.stopped_at == 5
    with pytest.raises(PromcseError, match="at least 1"):
        EarlyStopping(0)


def test_tensorboard_event_files_hold_the_losses_and_dev_scores(tiny_bert: Path, tiny_data: dict[str, Path],
                                                                tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tiny_bert, tiny_data, "train.report_to=tensorboard"), tmp_path / "run", show_progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/stsb_dev")] == [2, 4]


@pytest.mark.parametrize("override,key", [("train.report_to=wandb", "train.report_to"),
                                          ("train.early_stopping_patience=-1", "train.early_stopping_patience")])
def test_bad_tracking_settings_are_refused_by_key(tiny_bert: Path, tiny_data: dict[str, Path], override: str,
                                                  key: str) -> None:
    with pytest.raises(PromcseError) as err:
        validate(tiny_config(tiny_bert, tiny_data, override))
    assert err.value.key == key
