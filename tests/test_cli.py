"""End-to-end CLI on tiny data: train -> eval -> encode; bad input exits 2 with one message, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promcse.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROMCSE_DATA_DIR": ""}
    return subprocess.run([sys.executable, "-m", "promcse", *args], capture_output=True, text=True, env=env, timeout=300)


def test_train_eval_encode_end_to_end(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    proc = run_cli("train", "--set", f"model.backbone={tiny_bert}", "--set", "train.batch_size=8",
                   "--set", "model.prompt_length=4", "--set", "loss.name=nt_xent_eh",
                   "--train-file", str(tiny_data["csv"]), "--max-steps", "3", "--data-dir", str(tiny_data["data_dir"]),
                   "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "trained 3 steps" in proc.stdout
    assert sum(f.stat().st_size for f in out.iterdir()) < 1_000_000
    results = tmp_path / "r.json"
    proc = run_cli("eval", "--model", str(out), "--tasks", "stsb", "--data-dir", str(tiny_data["data_dir"]),
                   "--json", str(results), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(results.read_text())
    assert payload["model"] == str(out)
    assert set(payload["tasks"]) == {"STSBenchmark"} and -100 <= payload["tasks"]["STSBenchmark"]["spearman"] <= 100
    assert "avg" in payload
    texts = tmp_path / "texts.txt"
    texts.write_text("a man is playing guitar\nthe dog runs\n", encoding="utf-8")
    proc = run_cli("encode", "--model", str(out), "--input", str(texts), "--output", str(tmp_path / "v.npy"))
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "v.npy").shape == (2, 32)


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--set", "train.lrr=1", "--output", "{tmp}/o"], "did you mean 'lr'"),
        (["train", "--set", "train.batch_size=x", "--output", "{tmp}/o"], "expected int"),
        (["train", "--train-file", "{tmp}/missing.csv", "--output", "{tmp}/o"], "file not found"),
        (["train", "--train-file", "{tmp}/bad.csv", "--output", "{tmp}/o"], "missing column(s) hard_neg"),
        (["train", "--train-file", "{tmp}/s.txt", "--output", "{tmp}/o"], "needs hard negatives"),
        (["eval", "--model", "minilm", "--tasks", "stsx"], "stsx"),
        (["encode", "--model", "{tmp}", "--input", "{tmp}/s.txt", "--output", "{tmp}/v.npy"], "neither a promcse checkpoint"),
        (["index", "build", "--model", "minilm", "--input", "{tmp}/latin1.txt", "--output", "{tmp}/idx"], "not valid UTF-8"),
        (["eval", "--model", "minilm", "--tsv", "{tmp}/bad.csv"], "missing column"),
        (["eval", "--model", "minilm", "--data-dir", "{tmp}/nowhere"], "not found"),
        (["export", "--model", "{tmp}/nowhere", "--output", "{tmp}/st"], "nowhere"),
        (["train", "--resume", "{tmp}"], "no run_config.yaml"),
    ],
)
def test_bad_input_exits_2_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str) -> None:
    (tmp_path / "bad.csv").write_text("sent0,sent1\na,b\n", encoding="utf-8")
    (tmp_path / "s.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if argv[0] == "train" and "--resume" not in argv:
        argv += ["--config", str(Path(__file__).parents[1] / "configs" / "quickstart_minilm.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_bad_input_in_subprocess_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    proc = run_cli("encode", "--model", "minilm", "--input", str(bad), "--output", str(tmp_path / "v.npy"))
    assert proc.returncode == 2
    assert "not valid UTF-8" in proc.stderr and "line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_config_keys() -> None:
    proc = run_cli("train", "--help")
    assert proc.returncode == 0 and "train.grad_cache_chunk" in proc.stdout and "loss.eh_margin" in proc.stdout
