"""``promcse encode --engine ray`` and ``encode_dataset``: two actors on a local Ray instance write the same shard
files and manifest as the single-process encode (byte for byte from files; to float rounding from a dataset),
resume by re-encoding only the shards missing, and report bad rows with file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed: pip install -e '.[ray]'")

from conftest import make_prompt_checkpoint, make_sentences  # noqa: E402
from promcse.cli import main  # noqa: E402
from promcse.corpus.encode import EncodeJob, encode_corpus  # noqa: E402
from promcse.errors import PromcseError  # noqa: E402
from promcse.corpus.ray_encode import RayEncodeConfig, encode_dataset  # noqa: E402
from promcse.corpus.shards import MANIFEST, read_manifest, read_rows, read_vectors  # noqa: E402

TEXTS = make_sentences(230, seed=11)
IDS: list[Any] = [f"doc-{i}" if i % 3 else i for i in range(len(TEXTS))]  # strings and integers mixed


@pytest.fixture(scope="module")
def model(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_prompt_checkpoint(tiny_bert, tmp_path_factory.mktemp("ray_encode") / "news", seed=3, length=6))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray_corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t, "doc": i}) + "\n" for i, t in zip(IDS, TEXTS)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single(model: str, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process encode (the reference), on one thread like each actor (--cpus-per-worker 1): matmuls
    split over another number of threads sum in another order, and the bytes would differ in the last bits."""
    import promcse
    import torch

    out = tmp_path_factory.mktemp("single") / "vectors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_corpus(promcse.load(model, device="cpu"),
                      EncodeJob(corpus, out, shard_size=64, text_field="body", id_field="doc"), model)
    finally:
        torch.set_num_threads(threads)
    return out


def files_of(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def vectors_and_rows(root: Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    shards = read_manifest(root)["shards"]
    return (np.concatenate([read_vectors(root, e) for e in shards]), [r for e in shards for r in read_rows(root, e)])


def encode_on_ray(model: str, corpus: Path, out: Path, workers: int = 2) -> int:
    return main(["encode", "--engine", "ray", "--workers", str(workers), "--model", model, "--input", str(corpus),
                 "--output", str(out), "--shard-size", "64", "--text-field", "body", "--id-field", "doc",
                 "--device", "cpu", "--no-progress"])


def test_engine_ray_writes_the_single_process_files_byte_for_byte_and_resumes(
        ray_local: Any, model: str, corpus: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    assert encode_on_ray(model, corpus, out) == 0
    assert files_of(out) == files_of(single)  # shards, rows and manifest.json
    got, rows = vectors_and_rows(out)
    want, want_rows = vectors_and_rows(single)
    assert np.abs(got - want).max() <= 1e-6 and rows == want_rows and [r["id"] for r in rows] == IDS
    manifest = read_manifest(out)
    assert manifest["total_rows"] == 230 and [e["rows"] for e in manifest["shards"]] == [64, 64, 64, 38]

    (out / "shard-00002.npy").unlink()  # an interrupted run: shard 2 lost, the manifest not complete
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    kept = {name: (out / name).stat().st_mtime_ns for name in ("shard-00000.npy", "shard-00003.npy")}
    assert encode_on_ray(model, corpus, out, workers=1) == 0  # (one actor: the resume logic is the driver's)
    assert files_of(out) == files_of(single)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # done shards left alone


def test_encode_dataset_takes_a_ray_dataset_and_matches_the_single_process_vectors(
        ray_local: Any, model: str, single: Path, tmp_path: Path) -> None:
    dataset = ray.data.from_items([{"body": f"  {t} ", "doc": str(i)} for i, t in zip(IDS, TEXTS)],
                                  override_num_blocks=5)  # blocks that do not line up with the shards
    job = EncodeJob(Path("docs-dataset"), tmp_path / "ds", shard_size=64, text_field="body", id_field="doc")
    manifest = encode_dataset(dataset, job, model, RayEncodeConfig(workers=2))
    assert manifest["complete"] and [e["rows"] for e in manifest["shards"]] == [64, 64, 64, 38]
    assert manifest["input"] == {"ray_dataset": True, "text_field": "body", "id_field": "doc"}
    got, rows = vectors_and_rows(tmp_path / "ds")
    want, want_rows = vectors_and_rows(single)
    assert np.abs(got - want).max() <= 1e-6
    assert [r["text"] for r in rows] == TEXTS and [r["id"] for r in rows] == [str(i) for i in IDS]


def test_a_bad_row_stops_the_ray_encode_with_file_and_line(ray_local: Any, model: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "a man plays"}\n{"body": "a dog"}\n{"body": ""}\n', encoding="utf-8")
    assert main(["encode", "--engine", "ray", "--workers", "1", "--model", model, "--input", str(bad),
                 "--output", str(tmp_path / "out"), "--text-field", "body", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3" in err and "empty or whitespace-only text" in err and "Traceback" not in err
    with pytest.raises(PromcseError, match="key 'workers': must be at least 1"):
        RayEncodeConfig(workers=0).check()
    base = ["encode", "--model", model, "--input", str(bad), "--text-field", "body"]
    assert main([*base, "--engine", "ray", "--output", str(tmp_path / "v.npy")]) == 2  # a shard directory only
    assert main([*base, "--engine", "ray", "--output", str(tmp_path / "o2"), "--shard", "0/2"]) == 2
    assert main([*base, "--workers", "2", "--output", str(tmp_path / "o3")]) == 2  # needs --engine ray
    err = capsys.readouterr().err
    assert "shard directory" in err and "leave --shard out" in err and "need --engine ray" in err
