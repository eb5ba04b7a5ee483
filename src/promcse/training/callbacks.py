"""Hooks into the training loop: user callbacks, early stopping and experiment trackers (``train.report_to``).

The loop (:mod:`promcse.training.loop`) calls every callback on the main process only: ``on_step`` after each
optimizer step with that step's loss terms and learning rate, ``on_evaluate`` after each dev evaluation,
``on_save`` when a new best checkpoint is written, and ``on_end`` once. After each step it asks
``should_stop``; a run stopped early keeps its best checkpoint (runs under ``torchrun`` refuse early stopping:
the other processes could not learn of it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

TRACKERS: tuple[str, ...] = ("tensorboard",)


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


def reporters(report_to: str, out: Path) -> list[Callback]:
    """The trackers ``train.report_to`` names (comma-separated; empty or ``none``: none), logging under ``out``."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise PromcseError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} or none",
                           key="train.report_to")
    return [TensorBoardLogger(out / "tensorboard") for n in names if n == "tensorboard"]


def run_callbacks(callbacks: list[Callback], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback, in order."""
    for callback in callbacks:
        getattr(callback, hook)(*args)
