"""Index kinds: recall@10 against flat on a seeded clustered set, save/load round trips of every kind, search-time
settings, building from shards one shard at a time, the no-faiss fallback, and the CLI."""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

import promcse.corpus.shards
from promcse.cli import main
from promcse.errors import PromcseError
from promcse.corpus.search import FAISS_FILE, META_FILE, Index, build_from_vectors
from promcse.corpus.shards import FORMAT, FORMAT_VERSION, write_manifest, write_shard

faiss = pytest.importorskip("faiss")

N, DIM, CENTRES, NOISE = 5000, 32, 50, 1.0
SHARD = 700
# Minimum recall@10 against the exact flat index on the set below. Measured (faiss-cpu 1.15.1): ivf 0.99,
# ivfpq 0.98 with 100 rescored (0.42 from its 4-byte codes alone), hnsw 1.00, int8 0.99, binary 0.71 with 100
# rescored and 0.94 with 500 (D=32 gives only 32 sign bits, so binary needs the wider rescoring here).
THRESHOLDS: dict[str, tuple[dict, dict, float]] = {
    "flat": ({}, {}, 1.0),
    "ivf": ({}, {}, 0.95),
    "ivfpq": ({"nlist": 50, "nprobe": 8}, {}, 0.93),
    "hnsw": ({}, {}, 0.97),
    "int8": ({}, {}, 0.95),
    "binary": ({}, {"rescore": 500}, 0.88),
    "numpy": ({}, {}, 1.0),
}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """5,000 unit vectors of dim 32 drawn around 50 random centres (+ Gaussian noise), and 200 fresh queries."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CENTRES, DIM))
    base = unit(centres[rng.integers(0, CENTRES, N)] + NOISE * rng.normal(size=(N, DIM)))
    queries = unit(centres[rng.integers(0, CENTRES, 200)] + NOISE * rng.normal(size=(200, DIM)))
    return base, queries


@pytest.fixture(scope="module")
def truth(clustered) -> list[list[int]]:
    base, queries = clustered
    return [list(np.argsort(-(base @ q), kind="stable")[:10]) for q in queries]


def write_vectors(root: Path, vectors: np.ndarray, shard_size: int = SHARD, dtype: str = "float32") -> Path:
    """A shard directory as promcse encode writes it, without an encoder (ids d0, d1, ...)."""
    root.mkdir(parents=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "minilm", "dim": vectors.shape[1],
                "dtype": dtype, "normalize": True, "shard_size": shard_size, "with_texts": True, "input": {},
                "part": None, "complete": True, "total_rows": len(vectors), "shards": []}
    for number, start in enumerate(range(0, len(vectors), shard_size)):
        chunk = vectors[start:start + shard_size]
        ids = [f"d{i}" for i in range(start, start + len(chunk))]
        manifest["shards"].append(write_shard(root, number, start, chunk, ids, [f"text {i}" for i in ids], dtype))
    manifest["num_shards"] = len(manifest["shards"])
    write_manifest(root, manifest)
    return root


def recall(index: Index, queries: np.ndarray, truth: list[list[int]], **settings: int) -> float:
    hits = index.search_vectors(queries, top_k=10, **settings)
    return float(np.mean([len(set(t) & {h.id for h in row}) / 10 for t, row in zip(truth, hits)]))


@pytest.mark.parametrize("kind", list(THRESHOLDS))
def test_recall_at_10_and_save_load_round_trip(kind: str, clustered, truth, tmp_path: Path) -> None:
    base, queries = clustered
    build, search, threshold = THRESHOLDS[kind]
    index = Index(None, kind=kind, model_ref="minilm", **build)
    index.add_vectors([f"t{i}" for i in range(N)], base)
    assert index.kind == kind and len(index) == N and index.dim == DIM
    assert recall(index, queries, truth, **search) >= threshold
    before = index.search_vectors(queries[:20], top_k=10, **search)
    out = index.save(tmp_path / kind)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["backend"] == kind and meta["count"] == N and meta["dim"] == DIM
    assert meta["format_version"] == 3 and set(meta["files"]) == {p.name for p in out.iterdir()} - {META_FILE}
    assert (out / "store.npy").is_file() == (kind in ("ivfpq", "int8", "binary"))
    loaded = Index.load(out, encoder=object())
    after = loaded.search_vectors(queries[:20], top_k=10, **search)
    assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
    assert np.allclose([h.score for r in after for h in r], [h.score for r in before for h in r], atol=1e-6)
    assert not any(p.suffix in (".pkl", ".pickle") for p in out.iterdir())


def test_search_time_settings(clustered, truth) -> None:
    base, queries = clustered
    texts = [f"t{i}" for i in range(N)]
    ivf = Index(None, kind="ivf", nlist=64, nprobe=1)
    ivf.add_vectors(texts, base)
    assert recall(ivf, queries, truth) < 0.9 <= recall(ivf, queries, truth, nprobe=64) == 1.0
    hnsw = Index(None, kind="hnsw", hnsw_m=4)
    hnsw.add_vectors(texts, base)
    assert recall(hnsw, queries, truth, ef_search=10) < recall(hnsw, queries, truth, ef_search=400)
    binary = Index(None, kind="binary")
    binary.add_vectors(texts, base)
    codes_only = recall(binary, queries, truth, rescore=0)
    assert codes_only < recall(binary, queries, truth) < recall(binary, queries, truth, rescore=500)
    raw = binary.search_vectors(queries[:1], top_k=3, rescore=0)[0]
    assert all(-1.0 <= h.score <= 1.0 for h in raw)  # 1 - 2 * hamming / D without rescoring
    exact = binary.search_vectors(queries[:1], top_k=3, rescore=N)[0]
    assert np.allclose([h.score for h in exact], np.sort(base @ queries[0])[::-1][:3], atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "int8", "binary", "hnsw"])
def test_build_from_vectors_holds_one_shard_at_a_time(kind: str, clustered, truth, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base, queries = clustered
    root = write_vectors(tmp_path / "vectors", base)
    alive: list[weakref.ref] = []
    most = [0]
    real = promcse.corpus.shards.read_vectors

    def tracked(*args, **kwargs):
        most[0] = max(most[0], sum(ref() is not None for ref in alive))  # shards still held at this load
        vectors = real(*args, **kwargs)
        alive.append(weakref.ref(vectors))
        return vectors

    monkeypatch.setattr(promcse.corpus.shards, "read_vectors", tracked)
    build, search, threshold = THRESHOLDS[kind]
    index = build_from_vectors(root, kind=kind, train_size=2000, **build)
    assert most[0] == 0 and len(alive) >= 8  # every shard loaded (and sampled), none kept while loading another
    assert sum(ref() is not None for ref in alive) == 0
    assert len(index) == N and index.texts[7] == "text d7" and index.keys[7] == "d7"
    assert recall(index, queries, truth, **search) >= threshold - 0.02
    out = index.save(tmp_path / "idx")
    meta = json.loads((out / META_FILE).read_text())
    assert not (out / "store.npy").exists()
    if kind in ("ivfpq", "int8", "binary"):  # rescored from the shard files, memory-mapped
        assert meta["store"]["kind"] == "shards" and meta["store"]["path"] == str(root.resolve())
    loaded = Index.load(out, encoder=object())
    assert loaded.keys[7] == "d7" and recall(loaded, queries, truth, **search) == recall(index, queries, truth,
                                                                                         **search)


def test_int8_and_fp16_shards_rescore_from_stored_vectors(clustered, truth, tmp_path: Path) -> None:
    base, queries = clustered
    for dtype in ("int8", "float16"):
        root = write_vectors(tmp_path / dtype, base, dtype=dtype)
        index = build_from_vectors(root, kind="binary")
        assert recall(index, queries, truth, rescore=N) >= 0.97  # exact over the stored (quantised) vectors


def test_changed_shards_and_bad_directories_are_refused(clustered, tmp_path: Path) -> None:
    base, _ = clustered
    root = write_vectors(tmp_path / "vectors", base[:1000], shard_size=300)
    index = build_from_vectors(root, kind="int8")
    out = index.save(tmp_path / "idx")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["normalize"] = False
    write_manifest(root, manifest)
    with pytest.raises(PromcseError, match="changed since it was built"):
        Index.load(out, encoder=object())
    manifest["complete"] = False
    write_manifest(root, manifest)
    with pytest.raises(PromcseError, match="unfinished"):
        build_from_vectors(root, kind="flat")
    with pytest.raises(PromcseError, match="no manifest.json"):
        build_from_vectors(tmp_path, kind="flat")
    with pytest.raises(PromcseError, match="needs at least"):
        Index(None, kind="ivfpq", nlist=50).add_vectors(["a"] * 10, base[:10])


def test_without_faiss_every_kind_is_exact_numpy(clustered, truth, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, queries = clustered
    root = write_vectors(tmp_path / "vectors", base[:2000])
    small_truth = [list(np.argsort(-(base[:2000] @ q), kind="stable")[:10]) for q in queries]
    monkeypatch.setitem(sys.modules, "faiss", None)
    for kind in ("ivfpq", "hnsw", "int8", "binary"):
        index = build_from_vectors(root, kind=kind)
        assert index.kind == "numpy" and recall(index, queries, small_truth) == 1.0


def test_cli_from_vectors_build_and_search(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_sentences

    texts = list(dict.fromkeys(make_sentences(400, seed=3)))
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    vectors = tmp_path / "vectors"
    assert main(["encode", "--model", str(tiny_bert), "--input", str(tmp_path / "c.txt"), "--output", str(vectors),
                 "--shard-size", "100", "--dtype", "fp16", "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "idx"
    assert main(["index", "build", "--from-vectors", str(vectors), "--output", str(out), "--kind", "ivfpq",
                 "--nlist", "4", "--pq-m", "8", "--pq-bits", "4", "--train-size", "300"]) == 0
    assert f"indexed {len(texts)} vectors (ivfpq, dim 32)" in capsys.readouterr().out
    assert (out / FAISS_FILE).is_file()
    assert main(["index", "search", "--index", str(out), "--query", texts[5], "--top-k", "3", "--rescore",
                 str(len(texts)), "--nprobe", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()  # the tiny random BERT's vectors are nearly parallel: no ids
    assert printed[0] == f"query: {texts[5]}" and len(printed) == 4 and float(printed[1].split()[1]) > 0.999
    assert main(["index", "build", "--from-vectors", str(vectors), "--input", str(tmp_path / "c.txt"),
                 "--output", str(out)]) == 2
    assert "exactly one of" in capsys.readouterr().err
