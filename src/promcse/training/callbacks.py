"""Hooks into the training loop: user callbacks, early stopping and experiment trackers (``train.report_to``).

The loop (:mod:`promcse.training.loop`) calls every callback on the main process only: ``on_step`` after each
optimizer step with that step's loss terms and learning rate, ``on_evaluate`` after each dev evaluation,
``on_save`` when a new best checkpoint is written, and ``on_end`` once; a run that stops on an exception
calls ``on_error`` instead of ``on_end``. After each step it asks ``should_stop``; a run stopped early keeps
its best checkpoint (runs under ``torchrun`` refuse early stopping: the other processes could not learn of it).
The trackers (TensorBoard, MLflow) log from the main process only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

logger = logging.getLogger(__name__)

TRACKERS: tuple[str, ...] = ("tensorboard", "mlflow")
MLFLOW_PARAM_CHARS = 6000  # the longest param value MLflow stores


class Callback:
    """Base class: override the hooks you need (each is a no-op here)."""

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based): ``logs`` holds the loss terms and ``lr``."""

    def on_evaluate(self, step: int, name: str, score: float) -> None:
        """After a dev evaluation: the score's name (``stsb_dev``, ``retrieval_dev_ndcg@10``, ``dev``) and value."""

    def on_save(self, step: int, path: Path) -> None:
        """After the best checkpoint so far was written to ``path``."""

    def should_stop(self) -> bool:
        """Whether the run should end now (its best checkpoint is kept)."""
        return False

    def on_end(self, steps: int) -> None:
        """Once, after the last step taken."""

    def on_error(self, steps: int, error: BaseException) -> None:
        """Once, instead of ``on_end``, when the run stops on ``error`` after ``steps`` steps (interrupts too)."""


class EarlyStopping(Callback):
    """Stop after ``patience`` evaluations in a row without a score above the best by more than ``min_delta``."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise PromcseError(f"must be at least 1, got {patience}", key="train.early_stopping_patience")
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad = -math.inf, 0
        self.stopped_at: int | None = None

    def on_evaluate(self, step: int, name: str, score: float) -> None:
        """Count evaluations since the last improvement."""
        if score > self.best + self.min_delta:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
            if self.bad >= self.patience and self.stopped_at is None:
                self.stopped_at = step

    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row did not improve."""
        return self.stopped_at is not None


class TensorBoardLogger(Callback):
    """Loss terms, learning rate and dev scores as TensorBoard scalars under ``log_dir`` (offline: event files)."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PromcseError('TensorBoard logging needs the tensorboard package: pip install "promcse[track]"',
                               key="train.report_to") from None
        self.log_dir = Path(log_dir)
        self.writer: Any = SummaryWriter(log_dir=str(self.log_dir))

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        """Each term as ``train/<term>``."""
        for key, value in logs.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def on_evaluate(self, step: int, name: str, score: float) -> None:
        """The dev score as ``eval/<name>``."""
        self.writer.add_scalar(f"eval/{name}", score, step)
        self.writer.flush()

    def on_end(self, steps: int) -> None:
        """Write everything out."""
        self.writer.close()

    def on_error(self, steps: int, error: BaseException) -> None:
        """Write out what was logged."""
        self.writer.close()


class MLflowLogger(Callback):
    """One MLflow run per training run: the run config as params (``section.key``), the loss terms, ``lr`` and the
    dev score (under its own name) as step metrics, ``best_<dev name>`` at each new best checkpoint, whose folder
    is the tag ``promcse.best_checkpoint``.

    The tracking store is ``MLFLOW_TRACKING_URI`` when set, else a local file store ``<out>/mlruns`` (offline;
    MLflow 3.13+ keeps file stores behind ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for this process when
    unset); the experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``promcse``. The run starts at the first hook and ends
    FINISHED after the last step, KILLED when interrupted, FAILED on any other error.
    """

    def __init__(self, out: str | Path, params: dict[str, Any] | None = None) -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise PromcseError('MLflow tracking needs the mlflow-skinny package: pip install "promcse[track]"',
                               key="train.report_to") from None
        self.out = Path(out)
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.out.resolve() / "mlruns").as_uri()
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.params = flat_params(params or {})
        self.run_id: str | None = None
        self.ended = False
        self.last_score: tuple[str, float] | None = None
        try:  # reach the store now: a wrong URI fails before the first step
            self.client: Any = MlflowClient(self.tracking_uri)
            self.experiment_id = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "promcse")
        except MlflowException as err:
            raise PromcseError(f"MLflow tracking at {self.tracking_uri} failed: {err.message}",
                               key="train.report_to") from None

    def _experiment(self, name: str) -> str:
        """The id of experiment ``name``, created when missing."""
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _run(self) -> str:
        """The MLflow run, started (with the params) at its first use."""
        if self.run_id is None:
            from mlflow.entities import Param

            run = self.client.create_run(self.experiment_id, run_name=self.out.name,
                                         tags={"promcse.output_dir": str(self.out.resolve())})
            self.run_id = run.info.run_id
            items = [Param(key, value) for key, value in self.params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[start:start + 100], synchronous=True)
        return self.run_id

    def _metrics(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` at ``step``."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(metric_name(key), float(value), stamp, step) for key, value in values.items()]
        self.client.log_batch(self._run(), metrics=metrics, synchronous=True)

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        """Each loss term and ``lr`` as a metric at ``step``."""
        self._metrics(step, logs)

    def on_evaluate(self, step: int, name: str, score: float) -> None:
        """The dev score under its own name."""
        self.last_score = (name, score)
        self._metrics(step, {name: score})

    def on_save(self, step: int, path: Path) -> None:
        """The new best score as ``best_<name>`` and the checkpoint's folder and step as tags."""
        if self.last_score is not None:
            self._metrics(step, {f"best_{self.last_score[0]}": self.last_score[1]})
        self.client.set_tag(self._run(), "promcse.best_checkpoint", str(Path(path).resolve()))
        self.client.set_tag(self._run(), "promcse.best_step", str(step))

    def on_end(self, steps: int) -> None:
        """End the run FINISHED."""
        self._terminate("FINISHED")

    def on_error(self, steps: int, error: BaseException) -> None:
        """End the run KILLED (an interrupt: ``KeyboardInterrupt`` or the loop's ``TrainingInterrupted``, which
        carries the signal) or FAILED."""
        interrupted = isinstance(error, KeyboardInterrupt) or hasattr(error, "signum")
        self._terminate("KILLED" if interrupted else "FAILED")

    def _terminate(self, status: str) -> None:
        """End the run once (it is started first, so a run that fails at once is still recorded)."""
        if not self.ended:
            self.ended = True
            self.client.set_terminated(self._run(), status=status)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.01}}`` -> ``{"train.lr": "0.01"}``: lists as JSON, every value cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)[:MLFLOW_PARAM_CHARS]
        else:
            flat[name] = str(value)[:MLFLOW_PARAM_CHARS]
    return flat


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_-. /``): ``retrieval_dev_ndcg@10`` -> ``retrieval_dev_ndcg_at_10``."""
    return re.sub(r"[^\w.\- /]", "_", name.replace("@", "_at_"))


def reporters(report_to: str, out: Path, params: dict[str, Any] | None = None) -> list[Callback]:
    """The trackers ``train.report_to`` names (comma-separated; empty or ``none``: none), logging under ``out``;
    ``params`` (the run config as a nested dict) are an MLflow run's params."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise PromcseError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} or none",
                           key="train.report_to")
    built: list[Callback] = []
    for name in dict.fromkeys(names):  # each tracker once
        built.append(TensorBoardLogger(out / "tensorboard") if name == "tensorboard" else MLflowLogger(out, params))
    return built


def run_callbacks(callbacks: list[Callback], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback, in order."""
    for callback in callbacks:
        getattr(callback, hook)(*args)


def report_error(callbacks: list[Callback], steps: int, error: BaseException) -> None:
    """Call ``on_error`` on every callback; a callback that fails there is logged, so ``error`` stays the one raised."""
    for callback in callbacks:
        try:
            callback.on_error(steps, error)
        except Exception:  # noqa: BLE001 - the run's own error matters more
            logger.exception("%s.on_error failed", type(callback).__name__)
