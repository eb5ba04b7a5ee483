"""Query-side adaptation: the fixed-corpus losses against naive loops, the trainer, the dev carve, pseudo-queries,
``promcse adapt`` end to end (role pair whose document role is the frozen backbone)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from promcse.errors import PromcseError
from promcse.evaluation.beir import read_beir
from promcse.evaluation.retrieval import CorpusVectors, evaluate_encoder
from promcse.objectives.corpus_losses import corpus_hinge, corpus_nt_xent, query_corpus_similarity
from promcse.training.adapt import (AdaptSetup, adapt_corpus, adapt_labelled, carve_dev, pseudo_queries,
                                    read_documents)
from promcse.training.query_side import QueryRows, QueryTuneConfig, fit_queries, labelled_rows, query_encoder
from test_retrieval import write_beir

WORDS = ["man", "guitar", "dog", "park", "children", "book", "woman", "food", "cat", "music", "red", "blue"]


def naive_nt_xent(sim: torch.Tensor, relevant: torch.Tensor, tau: float) -> float:
    total = 0.0
    for i in range(sim.shape[0]):
        pos = [j for j in range(sim.shape[1]) if relevant[i, j]]
        neg = [j for j in range(sim.shape[1]) if not relevant[i, j]]
        terms = []
        for p in pos:
            denominator = math.exp(sim[i, p] / tau) + sum(math.exp(sim[i, j] / tau) for j in neg)
            terms.append(-math.log(math.exp(sim[i, p] / tau) / denominator))
        total += sum(terms) / len(terms)
    return total / sim.shape[0]


def naive_hinge(sim: torch.Tensor, relevant: torch.Tensor, margin: float) -> float:
    total = 0.0
    for i in range(sim.shape[0]):
        hardest = max(float(sim[i, j]) for j in range(sim.shape[1]) if not relevant[i, j])
        pos = [j for j in range(sim.shape[1]) if relevant[i, j]]
        total += sum(max(0.0, margin - float(sim[i, p]) + hardest) for p in pos) / len(pos)
    return total / sim.shape[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_corpus_losses_equal_naive_loops(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, d = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(11, 8, generator=g, dtype=torch.float64)
    relevant = torch.rand(5, 11, generator=g) < 0.25
    relevant[torch.arange(5), torch.randint(0, 11, (5,), generator=g)] = True
    sim = query_corpus_similarity(q, d)
    assert float(corpus_nt_xent(sim, relevant, 0.1)) == pytest.approx(naive_nt_xent(sim, relevant, 0.1), rel=1e-9)
    assert float(corpus_hinge(sim, relevant, 0.3)) == pytest.approx(naive_hinge(sim, relevant, 0.3), rel=1e-9)


def test_one_positive_is_nt_xent_over_the_corpus() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.4], [0.2, 0.3, 0.8]], dtype=torch.float64)
    relevant = torch.tensor([[True, False, False], [False, False, True]])
    expected = torch.nn.functional.cross_entropy(sim / 0.05, torch.tensor([0, 2]))
    assert float(corpus_nt_xent(sim, relevant, 0.05)) == pytest.approx(float(expected), rel=1e-6)


def test_losses_refuse_rows_without_positive_or_negative() -> None:
    sim = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="at least one relevant"):
        corpus_nt_xent(sim, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="no negative"):
        corpus_hinge(sim, torch.ones(2, 3, dtype=torch.bool))


def tiny_folder(root: Path, n_docs: int = 24, n_queries: int = 30, seed: int = 0) -> Path:
    """A BEIR folder over the tiny vocabulary: query i is about document i % n_docs (shares its first words)."""
    rng = np.random.default_rng(seed)
    docs = [(f"d{i}", "", " ".join(rng.choice(WORDS, 6)) + ". " + " ".join(rng.choice(WORDS, 6)) + ".")
            for i in range(n_docs)]
    queries = [(f"q{i}", " ".join(docs[i % n_docs][2].split()[:3])) for i in range(n_queries)]
    qrels = [(f"q{i}", f"d{i % n_docs}", 1) for i in range(n_queries)]
    write_beir(root, docs, queries, qrels, split="train")
    return write_beir(root, docs, queries, qrels[:10], split="test")


def test_carve_dev_is_stable_and_disjoint(tmp_path: Path) -> None:
    data = read_beir(tiny_folder(tmp_path / "b"), "train")
    train, dev = carve_dev(data, 0.3)
    again = carve_dev(data, 0.3)
    assert (train.query_ids, dev.query_ids) == (again[0].query_ids, again[1].query_ids)
    assert set(train.query_ids).isdisjoint(dev.query_ids) and len(train.query_ids) + len(dev.query_ids) == 30
    assert set(dev.qrels) == set(dev.query_ids) and dev.split == "train-dev"
    with pytest.raises(PromcseError, match="between 0 and 1"):
        carve_dev(data, 1.0)


def test_labelled_rows_use_only_relevant_documents_with_text(tmp_path: Path) -> None:
    docs = [("a", "", "dog park"), ("b", "", ""), ("c", "", "cat music")]
    folder = write_beir(tmp_path / "b", docs, [("q1", "dog"), ("q2", "cat")],
                        [("q1", "a", 1), ("q1", "b", 1), ("q1", "c", 0), ("q2", "c", 2)])
    data = read_beir(folder, "test")
    corpus = CorpusVectors([0, 2], np.eye(2, dtype=np.float32), "off")
    rows = labelled_rows(data, corpus)
    assert rows.texts == ["dog", "cat"] and rows.relevant == [[0], [1]]


def test_fit_queries_learns_and_keeps_the_best_epoch(tiny_bert: Path) -> None:
    """A prompt trained to send each query to its own (fixed) document vector lowers the loss; the kept epoch is
    the best dev epoch, and the frozen backbone itself is untouched."""
    encoder = query_encoder(str(tiny_bert), QueryTuneConfig(prompt_length=4))
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((6, encoder.dim)).astype(np.float32)
    corpus = CorpusVectors(list(range(6)), docs / np.linalg.norm(docs, axis=1, keepdims=True), "off")
    rows = QueryRows([" ".join(rng.choice(WORDS, 4)) for _ in range(12)], [[i % 6] for i in range(12)])
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    config = QueryTuneConfig(prompt_length=4, epochs=6, batch_size=4, lr=5e-2, patience=0, seed=1)

    relevant = torch.zeros(12, 6, dtype=torch.bool)
    relevant[torch.arange(12), [r[0] for r in rows.relevant]] = True

    def minus_loss(model: object) -> float:  # the dev score: the objective on the training rows, eval mode
        q = torch.from_numpy(model.encode(rows.texts, show_progress=False))  # type: ignore[attr-defined]
        return -float(corpus_nt_xent(query_corpus_similarity(q, torch.from_numpy(corpus.vectors)), relevant))

    start = minus_loss(encoder)
    result = fit_queries(encoder, rows, corpus, config, minus_loss, show_progress=False)
    assert result.history[0] == (0, start) and result.best_dev == max(s for _, s in result.history)
    assert result.best_dev > start + 0.1 and minus_loss(encoder) == pytest.approx(result.best_dev, abs=1e-5)
    assert result.trainable == sum(p.numel() for p in encoder.prompt.parameters())
    assert len(result.train_loss) == 6 and result.train_loss[-1] < result.train_loss[0]
    assert all(torch.equal(before[k], v) for k, v in encoder.backbone.state_dict().items())


def test_gated_query_prompt_starts_as_the_frozen_backbone(tiny_bert: Path) -> None:
    from promcse.models.loading import load

    gated = query_encoder(str(tiny_bert), QueryTuneConfig(prompt_length=4, prompt_gate=True)).eval()
    texts = ["dog park", "red cat music"]
    frozen = load(str(tiny_bert), device="cpu").encode(texts, show_progress=False)
    assert np.allclose(gated.encode(texts, show_progress=False), frozen, atol=1e-6)


def test_lora_and_full_modes_train_what_they_say(tiny_bert: Path) -> None:
    lora = query_encoder(str(tiny_bert), QueryTuneConfig(mode="lora", lora_rank=2))
    names = list(lora.trainable_tensors())
    assert names and all("lora_" in n for n in names)
    full = query_encoder(str(tiny_bert), QueryTuneConfig(mode="full"))
    assert sum(p.numel() for p in full.trainable_parameters()) == sum(p.numel() for p in full.backbone.parameters())
    with pytest.raises(PromcseError, match="unknown mode"):
        QueryTuneConfig(mode="adapter").check()


def test_pseudo_queries_sentences_and_titles(tmp_path: Path) -> None:
    docs = [("a", "Dog Facts", "The dog runs in the big park. It likes the red ball a lot."),
            ("b", "", "Two children are reading a book today. Short."), ("c", "", ""), ("d", "Cats", "")]
    folder = write_beir(tmp_path / "b", docs, [("q", "x")], [("q", "a", 1)])
    data = read_documents(folder)
    corpus = CorpusVectors([0, 1, 3], np.eye(3, dtype=np.float32), "off")
    titles = pseudo_queries(data, corpus, "title")
    assert titles.texts == ["Dog Facts", "Cats"] and titles.relevant == [[0], [2]]
    sentences = pseudo_queries(data, corpus, "sentence", seed=3)
    assert sentences.texts[1] == "Two children are reading a book today." and sentences.relevant == [[0], [1]]
    assert sentences.texts[0] in ("The dog runs in the big park.", "It likes the red ball a lot.")
    auto = pseudo_queries(data, corpus, "auto")
    assert auto.texts == ["Dog Facts", sentences.texts[1], "Cats"]
    with pytest.raises(PromcseError, match="unknown signal"):
        pseudo_queries(data, corpus, "keywords")


def test_read_documents_from_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("first document here.\nsecond one.\n", encoding="utf-8")
    data = read_documents(path)
    assert data.doc_texts == ["first document here.", "second one."] and data.split == "corpus"


def test_adapt_labelled_saves_a_query_only_role_pair(tiny_bert: Path, tmp_path: Path) -> None:
    """The saved pair's document role is the frozen backbone; its dev score is the one the run reported."""
    from promcse.models.loading import load

    folder = tiny_folder(tmp_path / "b")
    setup = AdaptSetup(backbone=str(tiny_bert), document_max_length=32, cache=tmp_path / "cache", show_progress=False)
    config = QueryTuneConfig(prompt_length=4, epochs=3, batch_size=8, lr=5e-2)
    _, result = adapt_labelled(folder, tmp_path / "out", "train", dev_fraction=0.3, config=config, setup=setup)
    roles = json.loads((tmp_path / "out" / "roles.json").read_text())
    assert roles["query"] == "query" and roles["document"] is None
    meta = json.loads((tmp_path / "out" / "query" / "config.json").read_text())["adapt"]
    assert meta["best_dev"] == result.best_dev and meta["document_max_length"] == 32
    pair = load(str(tmp_path / "out"), device="cpu")
    frozen = load(str(tiny_bert), device="cpu")
    texts = ["dog park", "red cat"]
    assert np.allclose(pair.encode_document(texts, show_progress=False), frozen.encode(texts, show_progress=False),
                       atol=1e-6)
    dev = carve_dev(read_beir(folder, "train"), 0.3)[1]
    score = evaluate_encoder(pair, dev, max_length=32, cache=tmp_path / "cache", show_progress=False)
    assert score["cache"] == "hit"  # the training run's corpus vectors: the index is the frozen one
    assert score["metrics"]["ndcg@10"] == pytest.approx(result.best_dev, abs=1e-6)


def test_adapt_corpus_runs_without_labels(tiny_bert: Path, tmp_path: Path) -> None:
    folder = tiny_folder(tmp_path / "b")
    setup = AdaptSetup(backbone=str(tiny_bert), document_max_length=32, cache=False, show_progress=False)
    _, result = adapt_corpus(folder, tmp_path / "out", "sentence", QueryTuneConfig(prompt_length=4, epochs=2,
                                                                                    batch_size=8), setup,
                             dev=(folder, "test"))
    assert result.best_epoch == 2 and result.best_dev is not None and result.steps == 2 * math.ceil(24 / 8)
    assert json.loads((tmp_path / "out" / "query" / "config.json").read_text())["adapt"]["pseudo_queries"] == 24


def test_cli_adapt_labels_and_corpus(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from promcse.cli import main

    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_folder(tmp_path / "b")
    common = ["--backbone", str(tiny_bert), "--document-max-length", "32", "--prompt-length", "4", "--epochs", "2",
              "--batch-size", "8", "--no-progress"]
    assert main(["adapt", "--labels", str(folder), "--output", str(tmp_path / "a"), *common]) == 0
    out = capsys.readouterr().out
    assert "best dev nDCG@10" in out and "query-only role pair" in out
    assert (tmp_path / "a" / "roles.json").is_file()
    assert main(["adapt", "--corpus", str(folder / "corpus.jsonl"), "--output", str(tmp_path / "c"), *common]) == 0
    assert "pseudo-queries" in capsys.readouterr().out
    assert main(["adapt", "--labels", str(folder), "--output", str(tmp_path / "d"), "--dev-fraction", "1.5",
                 *common]) == 2
    assert "--dev-fraction" in capsys.readouterr().err


def test_labelled_pairs_mine_negatives_that_are_never_relevant(tiny_bert: Path, tmp_path: Path) -> None:
    from promcse.io.data import read_training_file
    from promcse.training.adapt import mined_negatives, write_labelled_pairs

    corpus = CorpusVectors([0, 1, 2, 3], np.eye(4, dtype=np.float32), "off")
    query = np.array([[0.9, 0.8, 0.7, 0.1]], dtype=np.float32)
    assert mined_negatives(corpus, query, [[0]], 2) == [[1, 2]]
    assert mined_negatives(corpus, query, [[0, 1]], 2) == [[2, 3]]
    folder = tiny_folder(tmp_path / "b")
    setup = AdaptSetup(backbone=str(tiny_bert), document_max_length=32, cache=False, show_progress=False)
    n = write_labelled_pairs(folder, tmp_path / "pairs.jsonl", "train", 2, setup)
    examples = read_training_file(tmp_path / "pairs.jsonl", require_hard_negatives=True)
    data = read_beir(folder, "train")
    assert n == len(examples) == 30 and len(examples.negatives) == 2
    texts = dict(zip(data.doc_ids, data.doc_texts))
    for query_id, anchor, positive, neg1, neg2 in zip(data.query_ids, examples.anchor, examples.positive,
                                                      *examples.negatives):
        relevant = {texts[d] for d, s in data.qrels[query_id].items() if s > 0}
        assert positive in relevant and neg1 not in relevant and neg2 not in relevant and neg1 != neg2


def test_cli_adapt_pairs_out_writes_a_training_file(tiny_bert: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from promcse.cli import main
    from promcse.io.data import read_training_file

    folder = tiny_folder(tmp_path / "b")
    assert main(["adapt", "--labels", str(folder), "--pairs-out", str(tmp_path / "p.jsonl"), "--negatives", "2",
                 "--backbone", str(tiny_bert), "--document-max-length", "32", "--no-cache", "--no-progress"]) == 0
    assert "promcse train --set data.train_file=" in capsys.readouterr().out
    assert len(read_training_file(tmp_path / "p.jsonl", require_hard_negatives=True).negatives) == 2
    assert main(["adapt", "--labels", str(folder), "--temperature", "0", "--output", str(tmp_path / "o"),
                 "--backbone", str(tiny_bert), "--no-progress"]) == 2
    assert "--temperature" in capsys.readouterr().err
