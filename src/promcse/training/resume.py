"""Crash-safe training state: save every N steps, resume exactly where a run stopped.

A state is a directory ``state-<step>`` holding ``weights.safetensors`` (every trainable tensor: prompt and
head, plus the backbone in ``full`` mode), ``optimizer.safetensors`` (AdamW moments), ``rng.safetensors``
(torch CPU/CUDA generator states, numpy's state) and ``state.json`` (step, scheduler, python RNG, best
metric, history, the data order's seed). It is written to a temporary directory, fsynced and renamed, so a
kill during a save leaves the previous state intact; only the last ``keep`` states are kept. Nothing is
pickled: tensors go to safetensors, everything else to JSON.

The data order is a pure function of (seed, rows, batch size, epochs), so the position in it is the step.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from promcse.errors import PromcseError
from promcse.io.files import atomic_directory

STATE_PREFIX = "state-"


@dataclass
class LoopState:
    """Where a training loop is, besides its tensors.

    Attributes:
        step: Optimizer steps completed.
        best: Best STS-B dev score so far (``-inf`` if none).
        best_step: Step of the best score.
        history: Every evaluation as ``[step, score]``.
    """

    step: int = 0
    best: float = float("-inf")
    best_step: int = 0
    history: list[list[float]] = field(default_factory=list)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture every RNG the loop consumes."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [py_version, list(py_state), py_gauss]}
    return tensors, meta


def save_state(run_dir: str | Path, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler: Any, loop: LoopState, keep: int = 2) -> Path:
    """Atomically write a training state under ``run_dir`` and prune old ones; returns its path."""
    run = Path(run_dir)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng_tensors, rng_meta = _rng_tensors()
    meta = {"loop": loop.__dict__, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}

    def fill(tmp: Path) -> None:
        weights = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
        safetensors.torch.save_file(weights, str(tmp / "weights.safetensors"))
        safetensors.torch.save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        safetensors.torch.save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")

    final = atomic_directory(run / f"{STATE_PREFIX}{loop.step:08d}", fill)
    for old in list_states(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_states(run_dir: str | Path) -> list[Path]:
    """Complete states in a run directory, oldest first (temporary directories are ignored)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


# What a training run writes into its directory (besides state-* folders); a teacher cache is shared data, not a run.
RUN_FILES = ("run_config.yaml", "metrics.jsonl", "config.json", "prompt.safetensors", "head.safetensors",
             "model.safetensors", "canary.json")


def previous_run(run_dir: str | Path) -> list[str]:
    """Names of another run's files in ``run_dir`` (its states and outputs), sorted; empty for a fresh directory."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    return sorted(p.name for p in run.iterdir() if p.name in RUN_FILES or p.name.startswith(STATE_PREFIX))


def claim_run_dir(run_dir: str | Path, overwrite: bool = False) -> None:
    """Make ``run_dir`` hold one run: refuse one that holds another run's files, or (``overwrite``) remove them.

    Two runs' states side by side would let a later resume continue from a state of the wrong run.

    Raises:
        PromcseError: The directory holds another run and ``overwrite`` is false.
    """
    found = previous_run(run_dir)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise PromcseError(f"holds another training run ({shown}): resume it, choose a new or empty directory, or "
                           "overwrite it (its states and checkpoint are deleted first)", path=run_dir, key="output_dir")
    for name in found:
        target = Path(run_dir) / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def latest_state(run_dir: str | Path) -> Path:
    """The newest complete state, or a clear error if the directory has none."""
    states = list_states(run_dir)
    if not states:
        raise PromcseError("no saved training state to resume from (expected state-* folders)", path=run_dir)
    return states[-1]


def load_state(state_dir: str | Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               scheduler: Any) -> LoopState:
    """Restore weights, optimizer, scheduler and every RNG from a state; return the loop position."""
    path = Path(state_dir)
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = safetensors.torch.load_file(str(path / "weights.safetensors"))
        opt_tensors = safetensors.torch.load_file(str(path / "optimizer.safetensors"))
        rng = safetensors.torch.load_file(str(path / "rng.safetensors"))
    except (OSError, json.JSONDecodeError, safetensors.SafetensorError) as err:
        raise PromcseError(f"cannot read training state: {err}", path=path) from None
    if set(weights) != set(trainable):
        raise PromcseError("saved state does not match this model's trainable tensors (different config?)", path=path)
    check_shapes(weights, trainable, path)
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(_optimizer_state(opt_tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    _restore_rng(rng, meta["rng"])
    return LoopState(**meta["loop"])


def check_shapes(saved: dict[str, torch.Tensor], trainable: dict[str, torch.nn.Parameter], path: Path) -> None:
    """Refuse a state whose tensors have other shapes than the model's (e.g. saved with another prompt length)."""
    for name, param in trainable.items():
        if tuple(saved[name].shape) != tuple(param.shape):
            raise PromcseError(f"tensor '{name}' was saved with shape {tuple(saved[name].shape)}, the model has "
                               f"{tuple(param.shape)} (another prompt length or model?)", path=path)
        if not torch.isfinite(saved[name]).all():
            raise PromcseError(f"tensor '{name}' holds NaN or infinite values", path=path)


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))
