"""Lost compute and mixed runs: non-finite settings and parameters stop early; one output directory, one run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import promcse.training.loop as loop_module
from promcse.errors import PromcseError
from promcse.training.config import load_config, validate
from promcse.training.resume import list_states
from promcse.training.train import train


def config(tiny_bert: Path, data: dict[str, Path], *extra: str):  # noqa: ANN201
    return load_config(None, [f"model.backbone={tiny_bert}", "model.prompt_length=4", f"data.train_file={data['csv']}",
                              "loss.name=nt_xent_eh", "train.batch_size=8", "train.eval_every=-1", "train.max_steps=4",
                              *extra])


@pytest.mark.parametrize("override, key", [
    ("train.gate_lr=inf", "train.gate_lr"), ("loss.temperature=nan", "loss.temperature"),
    ("train.lr=1e400", "train.lr"), ("loss.eh_weight=-inf", "loss.eh_weight"),
    ("train.max_steps=99999999999999999999999", "train.max_steps"),
])
def test_non_finite_or_huge_settings_are_refused_before_anything_loads(override: str, key: str) -> None:
    with pytest.raises(PromcseError) as info:
        validate(load_config(None, [override]))
    assert info.value.key == key


def test_non_finite_values_set_from_python_are_refused_too() -> None:
    built = load_config(None, [])
    built.train.gate_lr = float("inf")
    with pytest.raises(PromcseError, match="finite") as info:
        validate(built)
    assert info.value.key == "train.gate_lr"


def test_a_step_that_makes_parameters_non_finite_stops_the_run_saving_nothing(
        tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop_module.train_step

    def poisoned(encoder, *args, **kwargs):  # noqa: ANN001, ANN202 - a step whose update blows a tensor up
        terms = real(encoder, *args, **kwargs)
        if poisoned.calls == 2:
            with torch.no_grad():
                next(iter(encoder.trainable_tensors().values())).fill_(float("inf"))
        poisoned.calls += 1
        return terms

    poisoned.calls = 0
    monkeypatch.setattr(loop_module, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(PromcseError, match="step 3 made trainable tensor") as info:
        train(config(tiny_bert, tiny_data, "train.save_every=1"), out, show_progress=False)
    assert "NaN or infinite" in str(info.value)
    assert not (out / "prompt.safetensors").exists()  # no checkpoint that nothing can load
    assert [p.name for p in list_states(out)] == ["state-00000001", "state-00000002"]  # the good steps only


def test_a_second_run_into_a_used_directory_is_refused_or_replaces_it(
        tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(tiny_bert, tiny_data, "train.save_every=1", "train.max_steps=3"), out, show_progress=False)
    assert len(list_states(out)) == 2
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(PromcseError, match="holds another training run"):
        train(config(tiny_bert, tiny_data, "model.prompt_length=6"), out, show_progress=False)
    train(config(tiny_bert, tiny_data, "model.prompt_length=6", "train.save_every=2"), out, show_progress=False,
          overwrite=True)
    assert [p.name for p in list_states(out)] == ["state-00000002", "state-00000004"]  # only the new run's
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"  # not a run file: kept


def test_resuming_a_state_of_another_prompt_length_names_the_tensor(
        tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(tiny_bert, tiny_data, "train.save_every=1", "train.max_steps=2"), out, show_progress=False)
    with pytest.raises(PromcseError, match=r"saved with shape .*another prompt length"):
        train(config(tiny_bert, tiny_data, "model.prompt_length=6", "train.max_steps=4"), out, show_progress=False,
              resume=True)


def test_the_cli_names_the_option_and_offers_overwrite(tiny_bert: Path, tiny_data: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "promcse", "train", "--set", f"model.backbone={tiny_bert}", "--set",
            "model.prompt_length=4", "--train-file", str(tiny_data["csv"]), "--set", "train.batch_size=8",
            "--set", "train.eval_every=-1", "--max-steps", "1", "--output", str(out), "--no-progress"]
    assert subprocess.run(args, capture_output=True, text=True, timeout=300).returncode == 0
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and f"--output {out}: holds another training run" in again.stderr, again.stderr
    assert subprocess.run(args + ["--overwrite"], capture_output=True, text=True, timeout=300).returncode == 0
