"""The training loop, run by every process: steps, then (main process only) logs, evaluation, checkpoints.

Every ``train.save_every`` steps the full training state is written atomically (:mod:`promcse.training.resume`);
``promcse train --resume DIR`` continues from the newest one and, on CPU, ends bit-identical to an
uninterrupted run. On the main process SIGINT/SIGTERM finish the current step, save a state and stop
with :class:`TrainingInterrupted`. Under ``torchrun`` the other processes run the same loop in lockstep
(each step has collectives) and skip everything that writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from promcse.models.checkpoint import save_checkpoint
from promcse.training.callbacks import Callback, report_error, run_callbacks
from promcse.training.config import TrainConfig
from promcse.io.data import TrainExamples
from promcse.training.distributed import DistContext, shard_rows
from promcse.errors import PromcseError
from promcse.encoder.model import SentenceEncoder
from promcse.objectives.objective import Objective
from promcse.training.resume import LoopState, save_state
from promcse.io.sources import Mixture
from promcse.training.step import train_step
from promcse.training.teacher import TeacherCache


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the state has been saved; carries where to resume from."""

    def __init__(self, step: int, run_dir: Path, signum: int) -> None:
        self.step, self.run_dir, self.signum = step, run_dir, signum
        super().__init__(f"interrupted at step {step}; state saved in {run_dir}: resume with train(..., resume=True)")


@dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        output_dir: Where the (best) checkpoint was saved.
        steps: Optimizer steps taken (in total, across resumes).
        best_dev: Best dev score seen (STS-B dev Spearman x100 by default; None if never evaluated).
        best_step: Step of that checkpoint.
        seconds: Wall time of the loop (this process only).
        history: Every evaluation as (step, dev Spearman).
    """

    output_dir: Path
    steps: int
    best_dev: float | None
    best_step: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TrainingRun:
    """Everything the loop works on, built by :func:`promcse.training.train.train`.

    Attributes:
        encoder: The model being trained.
        objective: Loss terms of view embeddings.
        examples: The training data.
        batches: Global row indices of every step, in order.
        optimizer: AdamW over the trainable tensors.
        scheduler: Learning-rate schedule (stepped once per step).
        train: The ``train`` config section.
        max_length: Training truncation (``data.max_length``).
        out: Run directory.
        dist: Process context; only the main process logs, evaluates and writes.
        scorer: Model-selection scorer, higher is better (main process; None = no evaluation).
        meta: Extra fields for every checkpoint's ``config.json`` (run config, row count).
        show_progress: Draw a tqdm bar (main process).
        teacher: The teacher's cached embeddings (distillation), or None.
        dev_name: The key the dev score is logged and saved under (``stsb_dev`` for STS-B dev).
        callbacks: Hooks called on the main process (:mod:`promcse.training.callbacks`).
    """

    encoder: SentenceEncoder
    objective: Objective
    examples: TrainExamples | Mixture
    batches: list[np.ndarray]
    optimizer: Any
    scheduler: Any
    train: TrainConfig
    max_length: int
    out: Path
    dist: DistContext
    scorer: Callable[[SentenceEncoder], float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    teacher: TeacherCache | None = None
    dev_name: str = "stsb_dev"
    callbacks: list[Callback] = field(default_factory=list)


@contextlib.contextmanager
def stop_signals(enabled: bool = True) -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (restored afterwards)."""
    caught: list[int] = []
    if not enabled:
        yield caught
        return
    handler = lambda signum, _frame: caught.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _metrics_log(run: TrainingRun, resumed: bool) -> contextlib.AbstractContextManager[IO[str] | None]:
    """``metrics.jsonl`` of the main process (appended to on resume); nothing elsewhere."""
    if not run.dist.is_main:
        return contextlib.nullcontext()
    return open(run.out / "metrics.jsonl", "a" if resumed else "w", encoding="utf-8")


def _log(handle: IO[str] | None, record: dict[str, Any]) -> None:
    if handle is not None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _step(run: TrainingRun, step: int) -> dict[str, float]:
    """Take step ``step`` (1-based) on this process's shard; stop on a non-finite loss."""
    rows = run.batches[step - 1]
    local = shard_rows(rows, run.dist)
    views = run.examples.views(local)
    teacher = run.teacher.views(views) if run.teacher is not None else None
    labels = torch.from_numpy(run.examples.labels_of(local)) if run.objective.needs_labels else None
    terms = train_step(run.encoder, run.objective, views, run.optimizer, run.scheduler, run.train, run.max_length,
                       run.dist, teacher, run.examples.is_contrastive(rows), labels)
    if not math.isfinite(terms["loss"]):
        raise PromcseError(f"loss became {terms['loss']} at step {step}; lower train.lr", key="train.lr")
    check_finite_parameters(run.encoder, step)
    return terms


def check_finite_parameters(encoder: SentenceEncoder, step: int) -> None:
    """Stop when a step left a trainable tensor NaN or infinite (the loss can stay finite, e.g. a gate at inf):
    nothing of that step is saved, and the message names the tensors."""
    bad = [name for name, tensor in encoder.trainable_tensors().items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise PromcseError(f"step {step} made trainable tensor(s) {', '.join(bad)} NaN or infinite; nothing of this "
                           "step was saved; lower train.lr (train.gate_lr for gates)", key="train.lr")


def run_loop(run: TrainingRun, state: LoopState | None = None) -> TrainResult:
    """Run the remaining steps (from ``state.step``); the main process evaluates, keeps the best, saves states.

    A run that stops on an exception (an interrupt too) calls the callbacks' ``on_error``, then raises it.
    """
    state = state or LoopState()
    try:
        return _run_steps(run, state)
    except BaseException as err:
        if run.dist.is_main:
            report_error(run.callbacks, state.step, err)
        raise


def _run_steps(run: TrainingRun, state: LoopState) -> TrainResult:
    """The body of :func:`run_loop`."""
    start, total, main = time.time(), len(run.batches), run.dist.is_main
    run.encoder.train()
    bar = tqdm(total=total, initial=state.step, disable=not (main and run.show_progress), desc="train", unit="step",
               dynamic_ncols=True)
    with _metrics_log(run, bool(state.step)) as log, stop_signals(main) as caught, bar:
        for step in range(state.step + 1, total + 1):
            terms = _step(run, step)
            state.step = step
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            bar.update(1)
            stop = bool(caught)  # read once: a signal arriving during the bookkeeping below is the next step's
            if main:
                _after_step(run, state, terms, log, bar, stop=stop, started=start)
            if stop:
                bar.write(f"signal {caught[0]}: state saved at step {step}")
                raise TrainingInterrupted(step, run.out, caught[0])
            if main and any(c.should_stop() for c in run.callbacks):
                bar.write(f"stopped early at step {step}; the best checkpoint (step {state.best_step}) is kept")
                break
    if run.scorer is None and main:
        state.best_step = state.step
        save_checkpoint(run.encoder, run.out, {**run.meta, "step": state.step})
        run_callbacks(run.callbacks, "on_save", state.step, run.out)
    if main:
        run_callbacks(run.callbacks, "on_end", state.step)
    history = [(int(s), float(d)) for s, d in state.history]
    best = None if run.scorer is None else state.best
    return TrainResult(run.out, state.step, best, state.best_step if main else total, time.time() - start, history)


def _after_step(run: TrainingRun, state: LoopState, terms: dict[str, float], log: IO[str] | None, bar: Any,
                stop: bool, started: float) -> None:
    """Main process, after each step: log, evaluate (keep the best checkpoint), save a training state."""
    step, last, t = state.step, state.step == len(run.batches), run.train
    lr = run.scheduler.get_last_lr()[0]
    if step % t.log_every == 0 or last:
        _log(log, {"step": step, "lr": lr, **terms, "elapsed": time.time() - started})
    run_callbacks(run.callbacks, "on_step", step, {**terms, "lr": lr})
    if run.scorer is not None and ((t.eval_every and step % t.eval_every == 0) or last):
        _evaluate(run, state, log, bar)
    if (t.save_every and step % t.save_every == 0) or stop:
        save_state(run.out, run.encoder.trainable_tensors(), run.optimizer, run.scheduler, state, keep=t.keep_states)


def _evaluate(run: TrainingRun, state: LoopState, log: IO[str] | None, bar: Any) -> None:
    """Score on the dev scorer; save the checkpoint when it is the best so far."""
    assert run.scorer is not None
    dev = run.scorer(run.encoder)
    run.encoder.train()
    state.history.append([state.step, dev])
    _log(log, {"step": state.step, run.dev_name: dev})
    shown = {"stsb_dev": "STS-B dev", "retrieval_dev_ndcg@10": "retrieval dev nDCG@10"}.get(run.dev_name, run.dev_name)
    bar.write(f"step {state.step}: {shown} {dev:.2f}")
    run_callbacks(run.callbacks, "on_evaluate", state.step, run.dev_name, dev)
    if dev > state.best:
        state.best, state.best_step = dev, state.step
        save_checkpoint(run.encoder, run.out, {**run.meta, "step": state.step, run.dev_name: dev})
        run_callbacks(run.callbacks, "on_save", state.step, run.out)
