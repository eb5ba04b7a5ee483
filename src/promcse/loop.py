"""The main process's training loop: steps, logging, evaluation, best checkpoint, crash-safe states.

Every ``train.save_every`` steps the full training state is written atomically (:mod:`promcse.resume`);
``promcse train --resume DIR`` continues from the newest one and, on CPU, ends bit-identical to an
uninterrupted run. SIGINT/SIGTERM finish the current step, save a state and stop with
:class:`TrainingInterrupted`.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from promcse.checkpoint import save_checkpoint
from promcse.config import RunConfig
from promcse.data import TrainExamples
from promcse.errors import PromcseError
from promcse.model import SentenceEncoder
from promcse.resume import LoopState, latest_state, load_state, save_state

StepFn = Callable[[SentenceEncoder, RunConfig, TrainExamples, np.ndarray, Any, Any], dict[str, float]]


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the state has been saved; carries where to resume from."""

    def __init__(self, step: int, run_dir: Path, signum: int) -> None:
        self.step, self.run_dir, self.signum = step, run_dir, signum
        super().__init__(f"interrupted at step {step}; state saved. Resume with: promcse train --resume {run_dir}")


@dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        output_dir: Where the (best) checkpoint was saved.
        steps: Optimizer steps taken (in total, across resumes).
        best_dev: Best STS-B dev Spearman x100 seen (None if never evaluated).
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


def trainable_tensors(encoder: SentenceEncoder) -> dict[str, torch.nn.Parameter]:
    """Every tensor the optimizer updates, by name (prompt and head; the backbone too in full mode)."""
    return {name: p for name, p in encoder.named_parameters() if p.requires_grad}


def check_disk_space(out: Path, encoder: SentenceEncoder, config: RunConfig) -> None:
    """Refuse to start when the output disk cannot hold the checkpoint and the kept states."""
    tensor_bytes = sum(p.numel() * p.element_size() for p in trainable_tensors(encoder).values())
    states = config.train.keep_states if config.train.save_every else 0
    needed = tensor_bytes * (1 + 3 * (states + 1)) + 50 * 2**20  # weights + Adam moments per state + slack
    free = shutil.disk_usage(out).free
    if free < needed:
        raise PromcseError(f"only {free / 2**20:.0f} MiB free, about {needed / 2**20:.0f} MiB needed", path=out)


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (restored afterwards)."""
    caught: list[int] = []
    handler = lambda signum, _frame: caught.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _log(handle: Any, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def restore(out: Path, encoder: SentenceEncoder, optimizer: Any, scheduler: Any) -> LoopState:
    """Load the newest saved state of a run into the encoder, optimizer, scheduler and RNGs."""
    return load_state(latest_state(out), trainable_tensors(encoder), optimizer, scheduler)


def run_loop(encoder: SentenceEncoder, config: RunConfig, examples: TrainExamples, batches: list[np.ndarray],
             optimizer: Any, scheduler: Any, scorer: Callable[[SentenceEncoder], float] | None, out: Path,
             show_progress: bool, step_fn: StepFn, state: LoopState | None = None) -> TrainResult:
    """Run the remaining steps (from ``state.step``), evaluate, keep the best checkpoint, save states."""
    state = state or LoopState()
    start, every, save_every = time.time(), config.train.eval_every, config.train.save_every
    meta = {"run_config": config.to_dict(), "train_rows": len(examples)}
    encoder.train()
    mode = "a" if state.step else "w"
    with open(out / "metrics.jsonl", mode, encoding="utf-8") as log, stop_signals() as caught, tqdm(
        total=len(batches), initial=state.step, disable=not show_progress, desc="train", unit="step", dynamic_ncols=True
    ) as bar:
        for step in range(state.step + 1, len(batches) + 1):
            terms = step_fn(encoder, config, examples, batches[step - 1], optimizer, scheduler)
            if not math.isfinite(terms["loss"]):
                raise PromcseError(f"loss became {terms['loss']} at step {step}; lower train.lr", key="train.lr")
            state.step = step
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            bar.update(1)
            if step % config.train.log_every == 0 or step == len(batches):
                _log(log, {"step": step, "lr": scheduler.get_last_lr()[0], **terms, "elapsed": time.time() - start})
            if scorer is not None and ((every and step % every == 0) or step == len(batches)):
                _evaluate(encoder, scorer, state, log, bar, out, meta)
            if (save_every and step % save_every == 0) or caught:
                save_state(out, trainable_tensors(encoder), optimizer, scheduler, state, keep=config.train.keep_states)
            if caught:
                bar.write(f"signal {caught[0]}: state saved at step {step}")
                raise TrainingInterrupted(step, out, caught[0])
    if scorer is None:
        state.best_step = len(batches)
        save_checkpoint(encoder, out, {**meta, "step": state.best_step})
    history = [(int(s), float(d)) for s, d in state.history]
    best = None if scorer is None else state.best
    return TrainResult(out, len(batches), best, state.best_step, time.time() - start, history)


def _evaluate(encoder: SentenceEncoder, scorer: Callable[[SentenceEncoder], float], state: LoopState, log: Any,
              bar: Any, out: Path, meta: dict[str, Any]) -> None:
    """Score on STS-B dev; save the checkpoint when it is the best so far."""
    dev = scorer(encoder)
    encoder.train()
    state.history.append([state.step, dev])
    _log(log, {"step": state.step, "stsb_dev": dev})
    bar.write(f"step {state.step}: STS-B dev {dev:.2f}")
    if dev > state.best:
        state.best, state.best_step = dev, state.step
        save_checkpoint(encoder, out, {**meta, "step": state.step, "stsb_dev": dev})
