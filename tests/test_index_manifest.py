"""Saved indexes carry a manifest (size and sha256 of every file) that ``Index.load`` checks, and re-saving
over an index is crash-safe: the old index stays loadable, whole, until the new one is complete.

Every kind is covered (flat, ivf, ivfpq, hnsw, int8, binary, and the numpy fallback). Each file of a saved
index is deleted, truncated and changed (same size, one byte flipped) in turn; each time the load fails
naming that file. Older directories (format 1 and 2, which have no manifest) still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import promcse.io.files
from promcse.corpus import index_kinds
from promcse.errors import PromcseError
from promcse.corpus.search import META_FILE, Index, build_from_vectors

pytest.importorskip("faiss")

N, DIM = 800, 16
KINDS: dict[str, dict] = {"flat": {}, "ivf": {"nlist": 4}, "ivfpq": {"nlist": 4, "pq_m": 4, "pq_bits": 4},
                          "hnsw": {}, "int8": {}, "binary": {}, "numpy": {}}


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    x = np.random.default_rng(3).normal(size=(N, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(kind: str, vectors: np.ndarray, prefix: str = "t") -> Index:
    index = Index(None, kind=kind, model_ref="none", **KINDS[kind])
    index.add_vectors([f"{prefix}{i}" for i in range(len(vectors))], vectors)
    return index


def top_text(directory: Path, query: np.ndarray) -> tuple[str, float]:
    hit = Index.load(directory, encoder=object()).search_vectors(query[None], top_k=1)[0][0]
    return hit.text, hit.score


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_file_is_listed_and_every_kind_of_damage_is_named(kind: str, vectors: np.ndarray,
                                                                tmp_path: Path) -> None:
    out = build(kind, vectors).save(tmp_path / "idx")
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    assert meta["format_version"] == 3
    files = sorted(p.name for p in out.iterdir() if p.name != META_FILE)
    assert sorted(meta["files"]) == files and len(files) >= 2
    for name in files:
        data = (out / name).read_bytes()
        assert meta["files"][name] == {"bytes": len(data), "sha256": promcse.io.files.sha256_file(out / name)}
    assert top_text(out, vectors[7])[0] == "t7"
    for name in files:
        original = (out / name).read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        for damage, content, message in (("missing", None, "missing"), ("truncated", original[:-5], "truncated"),
                                         ("changed", bytes(flipped), "checksum")):
            (out / name).unlink()
            if content is not None:
                (out / name).write_bytes(content)
            with pytest.raises(PromcseError, match=message) as caught:
                Index.load(out, encoder=object())
            assert caught.value.path == str(out / name), (damage, caught.value)
            (out / name).write_bytes(original)
    assert top_text(out, vectors[7])[0] == "t7"  # restored: loads again


def test_older_formats_without_a_manifest_load_but_format_3_needs_one(vectors: np.ndarray, tmp_path: Path) -> None:
    out = build("flat", vectors).save(tmp_path / "idx")
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    for version in (1, 2):  # what earlier promcse versions wrote: no "files"
        old = {k: v for k, v in meta.items() if k != "files"} | {"format_version": version}
        (out / META_FILE).write_text(json.dumps(old), encoding="utf-8")
        assert top_text(out, vectors[3])[0] == "t3"
    (out / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}), encoding="utf-8")
    with pytest.raises(PromcseError, match="files"):
        Index.load(out, encoder=object())
    partial = dict(meta, files={k: v for k, v in meta["files"].items() if k != "texts.jsonl"})
    (out / META_FILE).write_text(json.dumps(partial), encoding="utf-8")
    with pytest.raises(PromcseError, match="does not list texts.jsonl"):
        Index.load(out, encoder=object())
    escaping = dict(meta, files={**meta["files"], "../elsewhere": {"bytes": 1, "sha256": "0"}})
    (out / META_FILE).write_text(json.dumps(escaping), encoding="utf-8")
    with pytest.raises(PromcseError, match="file names"):
        Index.load(out, encoder=object())


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("kind", ["flat", "numpy", "int8"])
def test_resaving_keeps_the_old_index_loadable_until_the_new_one_is_complete(
        kind: str, exchange: bool, vectors: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:
        monkeypatch.setattr(promcse.io.files, "_exchange", lambda a, b: False)
    out = tmp_path / "idx"
    build(kind, vectors, prefix="old").save(out)
    new = build(kind, vectors[::-1].copy(), prefix="new")  # other texts at other ids
    seen: list[tuple[str, float]] = []
    real_write = new._write

    def observed_write(directory: Path) -> None:  # half-way through the new save, the old one is intact
        real_write(directory)
        seen.append(top_text(out, vectors[5]))

    monkeypatch.setattr(new, "_write", observed_write)
    new.save(out)
    assert seen and seen[0][0] == "old5" and seen[0][1] > 0.999
    assert top_text(out, vectors[5])[0] == f"new{N - 1 - 5}"
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temporary or old directory left behind

    def crash(directory: Path) -> None:  # a failure part-way through a save: texts written, then nothing
        (directory / "texts.jsonl").write_text('{"id": 0, "text": "partial"}\n', encoding="utf-8")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(new, "_write", crash)
    with pytest.raises(OSError):
        new.save(out)
    assert top_text(out, vectors[5])[0] == f"new{N - 1 - 5}"  # the previous save, whole
    assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_a_save_killed_mid_way_leaves_the_old_index(vectors: np.ndarray, tmp_path: Path) -> None:
    """A real SIGKILL while the new index's files are being written (a subprocess)."""
    import subprocess
    import sys

    out = tmp_path / "idx"
    build("numpy", vectors, prefix="old").save(out)
    script = f"""
import os, signal, numpy as np
from promcse.corpus.search import Index
index = Index(None, kind="numpy", model_ref="none")
index.add_vectors(["new"] * {N}, np.load({str(tmp_path / 'v.npy')!r})[::-1].copy())  # other vectors
real = np.save
def killed(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
np.save = killed
index.save({str(out)!r})
"""
    np.save(tmp_path / "v.npy", vectors)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert top_text(out, vectors[9]) == ("old9", pytest.approx(1.0, abs=1e-5))  # never old texts on new vectors
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("idx", "v.npy")]
    assert all(name.startswith(".idx.") for name in leftovers), leftovers  # hidden, never under the final name
    build("numpy", vectors, prefix="again").save(out)  # the next save works over it
    assert top_text(out, vectors[9])[0] == "again9"


def test_saving_over_other_files_or_the_rescored_shards_is_refused(vectors: np.ndarray, tmp_path: Path) -> None:
    from promcse.corpus.shards import FORMAT, FORMAT_VERSION, write_manifest, write_shard

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n", encoding="utf-8")
    with pytest.raises(PromcseError, match="not part of a promcse index"):
        build("flat", vectors).save(mine)
    assert (mine / "thesis.tex").read_text(encoding="utf-8") == "years of work\n"
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(PromcseError, match="not a directory"):
        build("flat", vectors).save(tmp_path / "file")
    root = tmp_path / "shards"
    root.mkdir()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "minilm", "dim": DIM, "dtype": "float32",
                "normalize": True, "shard_size": N, "with_texts": True, "input": {}, "part": None, "complete": True,
                "total_rows": N, "num_shards": 1,
                "shards": [write_shard(root, 0, 0, vectors, [f"d{i}" for i in range(N)], None, "float32")]}
    write_manifest(root, manifest)
    index = build_from_vectors(root, kind="int8")
    with pytest.raises(PromcseError, match="contains the input"):
        index.save(tmp_path)  # would replace the directory holding the shards it rescores from
    loaded = Index.load(index.save(tmp_path / "int8"), encoder=object())
    assert isinstance(loaded._store, index_kinds.ShardStore)
