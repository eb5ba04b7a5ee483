"""Training-state files: atomic save, pruning, exact restore of weights, optimizer, scheduler and RNGs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from promcse.errors import PromcseError
from promcse.training.resume import LoopState, latest_state, list_states, load_state, save_state


def setup(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 10)
    return layer, optimizer, scheduler


def step(layer: torch.nn.Linear, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    x = torch.randn(5, 4)
    loss = torch.nn.functional.dropout(layer(x), 0.5).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]


def test_resume_continues_bit_identically(tmp_path: Path) -> None:
    layer, optimizer, scheduler = setup()
    for _ in range(3):
        step(layer, optimizer, scheduler)
    random.random(), np.random.rand()
    save_state(tmp_path, dict(layer.named_parameters()), optimizer, scheduler, LoopState(step=3, best=1.5, best_step=2))
    for _ in range(2):
        step(layer, optimizer, scheduler)
    expected = [p.detach().clone() for p in layer.parameters()]
    py_next, np_next = random.random(), np.random.rand()

    other, opt2, sched2 = setup(seed=99)
    loop = load_state(latest_state(tmp_path), dict(other.named_parameters()), opt2, sched2)
    assert (loop.step, loop.best, loop.best_step) == (3, 1.5, 2)
    for _ in range(2):
        step(other, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(expected, other.parameters()))
    assert random.random() == py_next and np.random.rand() == np_next


def test_keeps_last_k_and_ignores_partial_writes(tmp_path: Path) -> None:
    layer, optimizer, scheduler = setup()
    for s in range(1, 5):
        save_state(tmp_path, dict(layer.named_parameters()), optimizer, scheduler, LoopState(step=s), keep=2)
    (tmp_path / ".state-00000009.abc.tmp").mkdir()  # a save killed half-way
    (tmp_path / "state-00000010").mkdir()  # no state.json: incomplete
    assert [p.name for p in list_states(tmp_path)] == ["state-00000003", "state-00000004"]
    assert latest_state(tmp_path).name == "state-00000004"


def test_mismatched_state_is_refused(tmp_path: Path) -> None:
    layer, optimizer, scheduler = setup()
    save_state(tmp_path, dict(layer.named_parameters()), optimizer, scheduler, LoopState(step=1))
    other = torch.nn.Linear(4, 3, bias=False)
    opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(PromcseError, match="does not match"):
        load_state(latest_state(tmp_path), dict(other.named_parameters()), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    with pytest.raises(PromcseError, match="no saved training state"):
        latest_state(tmp_path / "empty")
