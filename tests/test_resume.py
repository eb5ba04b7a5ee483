"""Crash safety: SIGKILL mid-run + --resume ends bit-identical; a crash inside a save keeps the old files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from promcse.models.checkpoint import load_checkpoint, save_checkpoint
from promcse.errors import PromcseError


def train_cmd(tiny_bert: Path, data: dict[str, Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "promcse", "train", "--set", f"model.backbone={tiny_bert}",
            "--set", "model.prompt_length=4", "--set", "loss.name=nt_xent_eh", "--train-file", str(data["csv"]),
            "--set", "train.batch_size=8", "--set", "train.epochs=20", "--set", "train.eval_every=-1",
            "--save-every", "1", "--output", str(out), "--no-progress"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PROMCSE_DATA_DIR": ""}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(directory / "prompt.safetensors"))


def test_sigkill_then_resume_is_bit_identical(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    subprocess.run(train_cmd(tiny_bert, tiny_data, reference), check=True, env=ENV, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_bert, tiny_data, killed), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "state-00000017").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "prompt.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "promcse", "train", "--resume", str(killed), "--no-progress"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(reference), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_state_and_exits_cleanly(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(tiny_bert, tiny_data, out)
    cmd[cmd.index("--save-every") + 1] = "0"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Resume with: promcse train --resume" in err and "Traceback" not in err
    assert list(out.glob("state-*"))


def test_a_signal_during_a_steps_bookkeeping_still_saves_a_state(tiny_bert: Path, tiny_data: dict[str, Path],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM arriving after a step's save decision (while it logs or evaluates) must not stop the run without a
    state: the run stops after the next step, with that step's state saved (a race CI once hit)."""
    import promcse.cli
    import promcse.training.loop as loop

    bookkeeping = loop._after_step

    def after_step(run, state, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        bookkeeping(run, state, *args, **kwargs)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs now, mid-bookkeeping

    monkeypatch.setattr(loop, "_after_step", after_step)
    monkeypatch.setenv("PROMCSE_DATA_DIR", "")
    out = tmp_path / "run"
    argv = train_cmd(tiny_bert, tiny_data, out)[3:]  # without "python -m promcse"
    argv[argv.index("--save-every") + 1] = "0"
    assert promcse.cli.main(argv) == 128 + signal.SIGTERM
    assert [p.name for p in sorted(out.glob("state-*"))] == ["state-00000003"]


def test_crash_during_checkpoint_write_keeps_previous(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_model import make

    encoder = make(tiny_bert).eval()
    save_checkpoint(encoder, tmp_path / "ckpt")
    before = encoder.encode(["a man is playing guitar"])
    with torch.no_grad():
        encoder.prompt.embedding.weight.add_(1.0)

    def crash(tensors: dict, filename: str, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(b"half-written")
        raise OSError("disk died")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(encoder, tmp_path / "ckpt")
    monkeypatch.undo()
    assert not list((tmp_path / "ckpt").glob(".*tmp"))
    assert torch.equal(torch.as_tensor(load_checkpoint(tmp_path / "ckpt").encode(["a man is playing guitar"])),
                       torch.as_tensor(before))


def test_resume_without_state_is_a_clear_error(tmp_path: Path) -> None:
    from promcse.cli import main

    (tmp_path / "run_config.yaml").write_text("train: {lr: 0.01}\n")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    with pytest.raises(PromcseError):
        from promcse.training.resume import latest_state

        latest_state(tmp_path)
