"""Index: flat/IVF/numpy agreement, threshold and top-k, save/load round trips, no-faiss fallback, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import promcse
import promcse.cli
from conftest import make_sentences
from promcse.errors import PromcseError
from promcse.corpus.search import FAISS_FILE, META_FILE, NUMPY_FILE, TEXTS_FILE, Index, default_nlist

faiss = pytest.importorskip("faiss")


class WordVectors:
    """A deterministic stand-in encoder: the sum of seeded random word vectors (no near-ties, unlike the tiny
    random BERT whose embeddings are all nearly parallel). Index only needs ``encode``."""

    def __init__(self, dim: int = 32) -> None:
        self.dim, self.table = dim, {}

    def vector(self, word: str) -> np.ndarray:
        if word not in self.table:
            seed = sum(ord(c) * 31 ** i for i, c in enumerate(word)) % 2**32
            self.table[word] = np.random.default_rng(seed).normal(size=self.dim)
        return self.table[word]

    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = False, show_progress: bool = False):
        out = np.stack([sum((self.vector(w) for w in t.split()), np.zeros(self.dim)) + 1e-3 for t in texts])
        return unit(out) if normalize else out.astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> WordVectors:
    return WordVectors()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(dict.fromkeys(make_sentences(150, seed=5)))  # distinct texts


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_search_is_exact_and_ordered(encoder, corpus: list[str]) -> None:
    index = Index(encoder, kind="flat")
    index.add(corpus)
    assert index.kind == "flat" and len(index) == len(corpus)
    queries = corpus[:5] + ["a dog plays in the park"]
    hits = index.search(queries, top_k=4)
    vecs = unit(encoder.encode(corpus))
    qv = unit(encoder.encode(queries))
    for row, q in zip(hits, qv):
        expected = np.argsort(-(vecs @ q), kind="stable")[:4]
        assert [h.id for h in row] == list(expected)
        assert np.allclose([h.score for h in row], (vecs @ q)[expected], atol=1e-5)
        assert all(isinstance(h, tuple) and h.text == corpus[h.id] for h in row)
    assert [h.id for h in hits[0]][0] == 0  # a corpus text finds itself first


def test_numpy_path_matches_flat(encoder, corpus: list[str]) -> None:
    flat, exact = Index(encoder, kind="flat"), Index(encoder, kind="numpy")
    flat.add(corpus)
    exact.add(corpus)
    queries = make_sentences(10, seed=9)
    for a, b in zip(flat.search(queries, top_k=7), exact.search(queries, top_k=7)):
        assert [h.id for h in a] == [h.id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_ivf_top1_matches_flat_on_seeded_set() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))  # clustered, as sentence embeddings are
    base = unit(centers[rng.integers(0, 20, size=2000)] + 0.3 * rng.normal(size=(2000, 32)))
    queries = unit(base[:200] + 0.01 * rng.normal(size=(200, 32)))
    texts = [f"t{i}" for i in range(len(base))]
    flat, ivf = Index(None, kind="flat"), Index(None, kind="ivf", nlist=16, nprobe=4)
    flat.add_vectors(texts, base)
    ivf.add_vectors(texts, base)
    assert ivf.kind == "ivf" and ivf._index.nlist == 16
    top_flat = [row[0].id for row in flat.search_vectors(queries, top_k=1)]
    top_ivf = [row[0].id for row in ivf.search_vectors(queries, top_k=1)]
    assert top_ivf == top_flat
    assert np.mean(np.array(top_flat) == np.arange(200)) > 0.95  # the queries are perturbed corpus vectors


def test_ivf_over_texts_and_auto_choice(encoder, corpus: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ivf = Index(encoder, kind="ivf", nlist=4, nprobe=4)  # nprobe == nlist: exhaustive, so exact
    ivf.add(corpus)
    flat = Index(encoder, kind="flat")
    flat.add(corpus)
    queries = make_sentences(8, seed=2)
    assert [r[0].id for r in ivf.search(queries, 1)] == [r[0].id for r in flat.search(queries, 1)]
    monkeypatch.setattr("promcse.corpus.search.AUTO_IVF_MIN", 100)
    auto = Index(encoder)
    auto.add(corpus)
    assert auto.kind == "ivf" and auto.nlist == default_nlist(len(corpus))
    with pytest.raises(PromcseError, match="needs at least"):
        Index(encoder, kind="ivf", nlist=50).add(corpus[:10])


def test_threshold_top_k_and_bad_arguments(encoder, corpus: list[str]) -> None:
    index = Index(encoder, kind="flat")
    index.add(corpus[:10])
    assert len(index.search("a man", top_k=50)[0]) == 10  # capped at the index size
    own = index.search([corpus[3]], top_k=10, threshold=0.9999)[0]
    assert [h.id for h in own] == [3]
    assert index.search([corpus[3]], top_k=10, threshold=1.01) == [[]]
    with pytest.raises(PromcseError):
        index.search("x", top_k=0)
    with pytest.raises(PromcseError):
        index.add("a single string")
    with pytest.raises(PromcseError, match="unknown index kind"):
        Index(encoder, kind="annoy")
    assert Index(encoder, kind="flat").search(["q"], top_k=3) == [[]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "numpy"])
def test_save_load_round_trip(tiny_bert: Path, tmp_path: Path, corpus: list[str], kind: str) -> None:
    texts = corpus + ["line\nbreak and \"quotes\" and ünïcödé ✓"]
    index = Index(str(tiny_bert), kind=kind, nlist=3 if kind == "ivf" else None)
    index.add(texts)
    before = index.search(texts[:3] + [texts[-1]], top_k=5)
    out = index.save(tmp_path / "idx")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["model"] == str(tiny_bert.resolve()) and meta["backend"] == kind and meta["count"] == len(texts)
    assert (out / (NUMPY_FILE if kind == "numpy" else FAISS_FILE)).is_file()
    assert len((out / TEXTS_FILE).read_text(encoding="utf-8").splitlines()) == len(texts)
    loaded = Index.load(out, device="cpu")  # the encoder comes from the saved reference
    assert loaded.texts == texts and loaded.kind == kind
    after = loaded.search(texts[:3] + [texts[-1]], top_k=5)
    assert [[h.id for h in r] for r in before] == [[h.id for h in r] for r in after]
    assert np.allclose([h.score for h in before[0]], [h.score for h in after[0]], atol=1e-6)


def test_without_faiss_uses_numpy(encoder, corpus: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_faiss = Index(encoder, kind="flat")
    with_faiss.add(corpus)
    with_faiss.save(tmp_path / "flat")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    for kind in ("auto", "flat", "ivf"):
        index = Index(encoder, kind=kind)
        index.add(corpus)
        assert index.kind == "numpy"
    hits = index.search(corpus[:4], top_k=3)
    assert [[h.id for h in r] for r in hits] == [[h.id for h in r] for r in with_faiss.search(corpus[:4], top_k=3)]
    index.save(tmp_path / "np")
    assert Index.load(tmp_path / "np", encoder=encoder).search(corpus[:1], 1)[0][0].id == 0
    with pytest.raises(PromcseError, match="faiss-cpu"):
        Index.load(tmp_path / "flat", encoder=encoder)


def test_load_rejects_bad_directories(encoder, corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(PromcseError, match="no meta.json"):
        Index.load(tmp_path, encoder=encoder)
    index = Index(encoder, kind="numpy")
    index.add(corpus[:5])
    out = index.save(tmp_path / "i")
    (out / TEXTS_FILE).write_text('{"id": 0, "text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(PromcseError, match="truncated or changed"):  # the checksum manifest (format 3)
        Index.load(out, encoder=encoder)
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    legacy = {k: v for k, v in meta.items() if k != "files"} | {"format_version": 1}  # no manifest to check
    (out / META_FILE).write_text(json.dumps(legacy), encoding="utf-8")
    with pytest.raises(PromcseError, match="line 2"):
        Index.load(out, encoder=encoder)
    (out / META_FILE).write_text(json.dumps({"format": "other"}), encoding="utf-8")
    with pytest.raises(PromcseError, match="wrong format"):
        Index.load(out, encoder=encoder)
    with pytest.raises(PromcseError, match="empty index"):
        Index(encoder).save(tmp_path / "empty")


def test_cli_index_build_and_search(tiny_bert: Path, tmp_path: Path, corpus: list[str],
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(corpus[:30]) + "\n", encoding="utf-8")
    out = tmp_path / "idx"
    argv = ["index", "build", "--model", str(tiny_bert), "--input", str(source), "--output", str(out), "--device", "cpu"]
    assert promcse.cli.main(argv) == 0
    assert "indexed 30 texts (flat" in capsys.readouterr().out
    assert promcse.cli.main(["index", "search", "--index", str(out), "--query", corpus[4], "--top-k", "2",
                             "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"[4] {corpus[4]}" in printed.splitlines()[1]
    assert promcse.cli.main(["index", "build", "--model", str(tiny_bert), "--input", str(tmp_path / "none.txt"),
                             "--output", str(out)]) == 2
    assert promcse.cli.main(["index", "search", "--index", str(tmp_path), "--query", "x"]) == 2
