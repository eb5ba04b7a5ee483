"""Streaming corpus encode: formats and bad rows, equality with encode_texts, dtypes, resume after SIGKILL,
--shard i/N + --merge, and the manifest checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_sentences
from promcse.cli import main
from promcse.cli.encode import parse_part
from promcse.corpus.encode import EncodeJob, encode_corpus, fingerprint
from promcse.io.corpus_files import iter_corpus
from promcse.encoder.encode import encode_texts
from promcse.errors import PromcseError
from promcse.corpus.shards import MANIFEST, dequantize, merge, quantize, read_manifest, read_rows, read_vectors


@pytest.fixture(scope="module")
def encoder(tiny_bert: Path):
    import promcse

    return promcse.load(str(tiny_bert), device="cpu")


@pytest.fixture
def texts() -> list[str]:
    return make_sentences(230, seed=11)


def write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def all_vectors(root: Path) -> np.ndarray:
    return np.concatenate([read_vectors(root, e) for e in read_manifest(root)["shards"]])


def files_of(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_stream_equals_encode_texts_in_every_dtype(encoder, texts: list[str], tmp_path: Path) -> None:
    source = write_txt(tmp_path / "c.txt", texts)
    reference = encode_texts(encoder, texts)
    for dtype in ("float32", "float16", "int8"):
        out = tmp_path / dtype
        manifest = encode_corpus(encoder, EncodeJob(source, out, shard_size=64, dtype=dtype), "m")
        assert manifest["complete"] and manifest["total_rows"] == 230 and manifest["num_shards"] == 4
        assert [e["rows"] for e in manifest["shards"]] == [64, 64, 64, 38]
        got = all_vectors(out)
        tolerance = {"float32": 1e-6, "float16": 1e-3, "int8": np.abs(reference).max() / 127 / 2 + 1e-7}[dtype]
        assert np.abs(got - reference).max() <= tolerance, dtype
        assert np.load(out / "shard-00000.npy").dtype == np.dtype(dtype)
        assert (out / "shard-00000.scales.npy").is_file() == (dtype == "int8")
    rows = [r for e in read_manifest(tmp_path / "float32")["shards"] for r in read_rows(tmp_path / "float32", e)]
    assert [r["id"] for r in rows] == list(range(230)) and [r["text"] for r in rows] == texts


def test_int8_keeps_a_per_vector_scale() -> None:
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) * np.arange(1, 6)[:, None]
    codes, scales = quantize(np.vstack([x, np.zeros((1, 8), np.float32)]), "int8")
    assert codes.dtype == np.int8 and scales.shape == (6,) and scales[-1] == 0
    assert np.abs(codes[:5]).max(axis=1).tolist() == [127] * 5
    assert np.abs(dequantize(codes, scales)[:5] - x).max(axis=1).max() <= (scales[:5] / 2 + 1e-7).max()


def test_formats_and_directories(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    write_txt(root / "a.txt", ["first line", "  second  "])
    (root / "b" / "c.jsonl").write_text('{"doc": "x1", "body": "json one"}\n\n{"doc": "x2", "body": "json two"}\n',
                                        encoding="utf-8")
    pq.write_table(pa.table({"doc": ["p1", "p2"], "body": ["pq one", "pq two"]}), root / "b" / "d.parquet")
    write_txt(root / ".hidden.txt", ["skipped"])
    (root / "notes.md").write_text("ignored", encoding="utf-8")
    assert list(iter_corpus(root / "b", "body", "doc")) == [("x1", "json one"), ("x2", "json two"),
                                                            ("p1", "pq one"), ("p2", "pq two")]
    assert list(iter_corpus(root / "a.txt")) == [(0, "first line"), (1, "second")]
    mixed = list(iter_corpus(root, "body"))  # no id field: the row number across files
    assert [i for i, _ in mixed] == list(range(6)) and mixed[2] == (2, "json one")
    names = [f["name"] for f in fingerprint(root, text_field="body")["files"]]
    assert names == ["a.txt", "b/c.jsonl", "b/d.parquet"]


@pytest.mark.parametrize("name,content,field,match", [
    ("empty.txt", b"fine\n\nafter\n", None, "line 2: empty"),
    ("spaces.txt", b"fine\n   \n", None, "line 2: empty"),
    ("latin1.txt", b"ok\ncaf\xe9\n", None, "line 2: not valid UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', None, "line 2, column 13: invalid JSON"),
    ("missing.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', None, "line 2, column text: missing or non-text"),
    ("blank.jsonl", b'{"text": "a"}\n{"text": " "}\n', None, "line 2, column text: empty"),
    ("array.jsonl", b'["a"]\n', None, "line 1: each line must be a JSON object"),
    ("noid.jsonl", b'{"text": "a", "id": 1}\n{"text": "b"}\n', "id", "line 2, column id: missing id"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, name: str, content: bytes, field: str | None,
                                     match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromcseError, match=match) as info:
        list(iter_corpus(path, id_field=field))
    assert str(path) in str(info.value)


def test_bad_parquet_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    with pytest.raises(PromcseError, match=r"t.parquet, line 2, column text: missing or non-text"):
        list(iter_corpus(path))
    pq.write_table(pa.table({"text": ["a", "  "]}), path)
    with pytest.raises(PromcseError, match=r"line 2, column text: empty"):
        list(iter_corpus(path))
    with pytest.raises(PromcseError, match="missing column.*doc"):
        list(iter_corpus(path, id_field="doc"))


def test_cli_bad_row_exits_2(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.jsonl").write_text('{"text": "a dog"}\nnot json\n', encoding="utf-8")
    argv = ["encode", "--model", str(tiny_bert), "--input", str(tmp_path / "c.jsonl"), "--output",
            str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "c.jsonl, line 2" in err and "invalid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "out" / MANIFEST).exists()
    assert main(["encode", "--output", str(tmp_path / "o")]) == 2
    assert "needs --model and --input" in capsys.readouterr().err


# A child that encodes slowly (a pause after each manifest update), so that the test can kill it mid-run.
SLOW_CHILD = """
import sys, time
import promcse.corpus.encode as corpus
real = corpus.write_manifest
def slow(root, manifest):
    real(root, manifest)
    time.sleep(float(sys.argv[1]))
corpus.write_manifest = slow
from promcse.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_child(argv: list[str], pause: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(pause), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def listed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / MANIFEST).read_text())["shards"])
    except (OSError, ValueError):
        return 0


def test_resume_after_sigkill_is_byte_identical(tiny_bert: Path, texts: list[str], tmp_path: Path) -> None:
    source = write_txt(tmp_path / "c.txt", texts)
    args = lambda out: ["encode", "--model", str(tiny_bert), "--input", str(source), "--output", str(out),  # noqa: E731
                        "--shard-size", "40", "--dtype", "fp16", "--device", "cpu", "--no-progress"]
    reference = run_child(args(tmp_path / "whole"), 0.0)  # the uninterrupted run, alongside
    child = run_child(args(tmp_path / "killed"), 2.0)
    deadline = time.monotonic() + 240
    while listed_shards(tmp_path / "killed") < 1:
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before its first shard"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    interrupted = read_manifest(tmp_path / "killed")
    assert not interrupted["complete"] and 1 <= len(interrupted["shards"]) < 6
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()  # type: ignore[union-attr]
    again = run_child(args(tmp_path / "killed"), 0.0)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()  # type: ignore[union-attr]
    assert files_of(tmp_path / "killed") == files_of(tmp_path / "whole")  # no leftovers, same bytes


def test_resume_skips_verified_shards_and_redoes_corrupt_ones(encoder, texts: list[str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_txt(tmp_path / "c.txt", texts)
    job = EncodeJob(source, tmp_path / "out", shard_size=50)
    encode_corpus(encoder, job, "m")
    before = files_of(job.output)
    (job.output / "shard-00002.npy").write_bytes(b"garbage")
    (job.output / ".shard-00003.npy.abc.tmp").write_bytes(b"half-written")
    calls: list[int] = []
    import promcse.corpus.encode as corpus

    real = corpus.encode_texts
    monkeypatch.setattr(corpus, "encode_texts", lambda enc, t, **kw: calls.append(len(t)) or real(enc, t, **kw))
    encode_corpus(encoder, job, "m")
    assert calls == [50]  # only the corrupt shard again
    assert files_of(job.output) == before
    with pytest.raises(PromcseError, match="dtype differ"):
        encode_corpus(encoder, EncodeJob(source, job.output, shard_size=50, dtype="int8"), "m")
    write_txt(source, texts[::-1])  # same size, other content
    with pytest.raises(PromcseError, match="input differ"):
        encode_corpus(encoder, job, "m")


def test_each_encoded_shard_hands_free_heap_back(encoder, texts: list[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13/15: after each shard it encodes (not the skipped ones) the encode calls malloc_trim, so that the
    free holes left by batches of every shape do not pile up over a long corpus (RSS bounded by the shard)."""
    import promcse.corpus.encode as corpus

    trims: list[int] = []
    monkeypatch.setattr(corpus, "malloc_trim", lambda: trims.append(1) or True)
    job = EncodeJob(write_txt(tmp_path / "c.txt", texts), tmp_path / "out", shard_size=40)
    first = encode_corpus(encoder, EncodeJob(job.input, job.output, shard_size=40, part=(0, 2)), "m")
    assert len(trims) == len(first["shards"]) > 0
    trims.clear()
    encode_corpus(encoder, EncodeJob(job.input, job.output, shard_size=40, part=(0, 2)), "m")  # all done: skipped
    assert trims == []
    whole = encode_corpus(encoder, EncodeJob(job.input, tmp_path / "out2", shard_size=40), "m")
    assert len(trims) == whole["num_shards"]


def test_split_parts_merge_to_one_run(encoder, texts: list[str], tmp_path: Path) -> None:
    source = write_txt(tmp_path / "c.txt", texts)
    job = lambda out, part=(0, 1): EncodeJob(source, tmp_path / out, shard_size=30, dtype="int8", part=part)  # noqa: E731
    encode_corpus(encoder, job("whole"), "m")
    first = encode_corpus(encoder, job("p0", (0, 2)), "m")
    assert [e["index"] for e in first["shards"]] == [0, 2, 4, 6] and first["part"] == {"index": 0, "count": 2}
    with pytest.raises(PromcseError, match="missing from the parts"):
        merge([tmp_path / "p0"], tmp_path / "merged")
    encode_corpus(encoder, job("p1", (1, 2)), "m")
    with pytest.raises(PromcseError, match="part 0/2"):
        from promcse.corpus.shards import require_complete

        require_complete(tmp_path / "p0")
    with pytest.raises(PromcseError, match="in both"):
        merge([tmp_path / "p0", tmp_path / "p1", tmp_path / "p0"], tmp_path / "merged")
    assert main(["encode", "--merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--output",
                 str(tmp_path / "merged")]) == 0
    assert files_of(tmp_path / "merged") == files_of(tmp_path / "whole")
    before = files_of(tmp_path / "p0")
    for bad, message in [("p0", "key 'output': contains the input"), ("p0/sub", "inside the input directory"),
                         (".", "key 'output': contains the input")]:  # a part, under a part, above a part
        with pytest.raises(PromcseError, match=message):
            merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / bad)
    assert files_of(tmp_path / "p0") == before and not (tmp_path / "p0" / "sub").exists()
    encode_corpus(encoder, EncodeJob(source, tmp_path / "other", shard_size=30, part=(1, 2)), "m")
    with pytest.raises(PromcseError, match="dtype"):
        merge([tmp_path / "p0", tmp_path / "other"], tmp_path / "bad")


def test_cli_streaming_and_single_file_outputs(tiny_bert: Path, texts: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"key": f"d{i}", "body": t}) + "\n" for i, t in enumerate(texts[:20])),
                      encoding="utf-8")
    out = tmp_path / "vectors"
    assert main(["encode", "--model", str(tiny_bert), "--input", str(source), "--output", str(out), "--device",
                 "cpu", "--text-field", "body", "--id-field", "key", "--shard-size", "8", "--no-texts",
                 "--full-hash", "--no-progress"]) == 0
    assert "3 shard(s), 20 of 20 rows (float32, dim 32)" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["input"]["hash"] == "full" and manifest["model"] == str(tiny_bert.resolve())
    assert read_rows(out, manifest["shards"][0])[0] == {"id": "d0"}
    write_txt(tmp_path / "t.txt", texts[:5])
    assert main(["encode", "--model", str(tiny_bert), "--input", str(tmp_path / "t.txt"), "--output",
                 str(tmp_path / "v.npy"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "v.npy").shape == (5, 32)


def test_parse_part() -> None:
    assert parse_part("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(PromcseError):
            parse_part(bad)


def test_npy_output_honours_no_progress_and_refuses_shard_options(tiny_bert: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.txt").write_text("a dog runs\nthe cat sleeps\n" * 40, encoding="utf-8")
    argv = ["encode", "--model", str(tiny_bert), "--input", str(tmp_path / "t.txt"), "--output",
            str(tmp_path / "v.npy"), "--device", "cpu", "--batch-size", "4"]
    assert main(argv + ["--no-progress"]) == 0
    quiet = capsys.readouterr().err
    assert "batch" not in quiet and "%|" not in quiet  # no tqdm bar
    assert main(argv) == 0
    assert "%|" in capsys.readouterr().err  # the bar is there without the flag
    for extra in (["--shard", "0/2"], ["--dtype", "int8"], ["--shard-size", "10"]):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert f"{extra[0]} apply to a shard directory only" in err, err
