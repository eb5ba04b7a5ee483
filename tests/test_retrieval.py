"""Retrieval evaluation on BEIR folders: reading, ranking, metrics (against a naive reference and pytrec_eval),
the corpus embedding cache, the document fingerprint, ``promcse eval --retrieval`` and ``promcse compare``."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytrec_eval
from scipy import stats

from conftest import make_prompt_checkpoint
from promcse.cli import main
from promcse.cli.eval import parse_retrieval
from promcse.errors import PromcseError
from promcse.evaluation import compare as compare_mod
from promcse.evaluation.beir import read_beir
from promcse.evaluation.embedding_cache import cache_key
from promcse.evaluation.fingerprint import document_fingerprint
from promcse.evaluation.retrieval import evaluate_encoder, evaluate_retrieval, rank, score_run

# A toy dataset. Query q1 has graded judgements (d1: 2, d2: 1, d3: 0), q2 one relevant document, "d4" is a query
# whose id is also a document's (that document is relevant to it, but BEIR leaves it out of its results), q3 is
# not judged, and d6 is empty.
DOCS = [("d1", "red", "dog runs"), ("d2", "", "blue cat sleeps"), ("d3", "green", "ball"), ("d4", "", "music book"),
        ("d5", "two", "men riding horse"), ("d6", " ", ""), ("d7", "old", "woman reading")]
QUERIES = [("q1", "a red dog"), ("q2", "the sleeping cat"), ("q3", "unjudged query"), ("d4", "music")]
QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q1", "d3", 0), ("q2", "d5", 1), ("d4", "d4", 1), ("d4", "d7", 1)]


def write_beir(folder: Path, docs: list[Any] = DOCS, queries: list[Any] = QUERIES, qrels: list[Any] = QRELS,
               split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x, "metadata": {}}) + "\n"
                                                 for i, t, x in docs), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries),
                                          encoding="utf-8")
    rows = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{s}" for q, d, s in qrels)]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


# Document vectors on a circle: a query at angle 0 ranks documents by cos(angle).
ANGLES = {"red dog runs": 0.5, "blue cat sleeps": 0.1, "green ball": 0.3, "music book": 0.2,
          "two men riding horse": 0.9, "old woman reading": 1.2}
QUERY_ANGLE = {"a red dog": 0.0, "the sleeping cat": 1.0, "music": 0.0}


class Spy:
    """An encoder by table: texts -> 2-d vectors at their angle; counts calls and texts."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        angles = [ANGLES.get(t, QUERY_ANGLE.get(t, 2.0)) for t in texts]
        return np.asarray([[math.cos(a), math.sin(a)] * 1 for a in angles], dtype=np.float32) * 3.0


def naive_metrics(ranked: list[str], judged: dict[str, int]) -> dict[str, float]:
    """trec_eval's definitions, by hand: linear-gain nDCG@10, recip_rank within 10, recall@100, AP@100."""
    relevant = {d for d, s in judged.items() if s > 0}
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]) if judged.get(d, 0) > 0)
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted((s for s in judged.values() if s > 0),
                                                                  reverse=True)[:10]))
    rr = next((1 / (i + 1) for i, d in enumerate(ranked[:10]) if d in relevant), 0.0)
    hits = [i for i, d in enumerate(ranked[:100]) if d in relevant]
    ap = sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / len(relevant)
    return {"ndcg@10": 100 * dcg / ideal, "mrr@10": 100 * rr, "recall@100": 100 * len(hits) / len(relevant),
            "map@100": 100 * ap}


def test_metrics_match_a_hand_computed_reference(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "toy")
    with pytest.warns(UserWarning, match="1 of 7 documents .* empty"):
        result = evaluate_retrieval(Spy(), Spy(), folder, cache=False, show_progress=False)
    # By angle from 0: d2 (0.1), d4 (0.2), d3 (0.3), d1 (0.5), d5 (0.9), d7 (1.2); from 1.0: d5, d7, d1, d3, d4, d2.
    expected = {"q1": naive_metrics(["d2", "d4", "d3", "d1", "d5", "d7"], {"d1": 2, "d2": 1, "d3": 0}),
                "q2": naive_metrics(["d5", "d7", "d1", "d3", "d4", "d2"], {"d5": 1}),
                "d4": naive_metrics(["d2", "d3", "d1", "d5", "d7"], {"d4": 1, "d7": 1})}  # d4 left out of its own list
    assert set(result["per_query"]) == {"q1", "q2", "d4"}  # q3 has no judgements: not scored
    for query, values in expected.items():
        assert result["per_query"][query] == pytest.approx(values, abs=1e-9)
    for name in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert result["metrics"][name] == pytest.approx(np.mean([v[name] for v in expected.values()]))
    assert (result["queries"], result["documents"], result["empty_documents"]) == (3, 7, 1)
    assert result["cache"] == "off" and result["ignore_identical_ids"] is True


def test_identical_ids_can_be_kept_and_empty_documents_are_never_encoded(tmp_path: Path) -> None:
    folder, spy = write_beir(tmp_path / "toy"), Spy()
    with pytest.warns(UserWarning):
        result = evaluate_retrieval(spy, spy, folder, cache=False, ignore_identical_ids=False, show_progress=False)
    assert result["per_query"]["d4"]["recall@100"] == 100.0
    assert "" not in spy.calls[0] and len(spy.calls[0]) == 6 and spy.calls[1] == ["a red dog", "the sleeping cat",
                                                                                   "music"]


def test_score_run_equals_pytrec_eval_called_directly() -> None:
    rng = np.random.default_rng(3)
    docs = [f"d{i}" for i in range(300)]
    qrels = {f"q{j}": {d: int(rng.integers(0, 3)) for d in rng.choice(docs, 6, replace=False)} for j in range(20)}
    run = {}
    for q in qrels:
        scores = rng.normal(size=len(docs))
        order = np.argsort(-scores)
        run[q] = {docs[i]: float(scores[i]) for i in order}
    ours = score_run(qrels, run)
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"}).evaluate(run)
    top10 = {q: dict(sorted(r.items(), key=lambda kv: -kv[1])[:10]) for q, r in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    for q in qrels:
        assert ours[q]["ndcg@10"] == pytest.approx(100 * full[q]["ndcg_cut_10"])
        assert ours[q]["recall@100"] == pytest.approx(100 * full[q]["recall_100"])
        assert ours[q]["map@100"] == pytest.approx(100 * full[q]["map_cut_100"])
        assert ours[q]["mrr@10"] == pytest.approx(100 * rr[q]["recip_rank"])
        ranked = list(run[q])
        assert ours[q] == pytest.approx(naive_metrics(ranked, qrels[q]) if any(qrels[q].values()) else ours[q])


def test_rank_is_exact_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(7, 5)), rng.normal(size=(50, 5))
    monkeypatch.setattr("promcse.evaluation.retrieval.SCORE_BUDGET", 120)  # 2 queries a block
    got = rank(q, d, 10, exclude=np.asarray([3, -1, -1, -1, -1, -1, 49]))
    for i, hits in enumerate(got):
        scores = q[i] @ d.T
        left_out = {0: 3, 6: 49}.get(i)
        allowed = [j for j in np.argsort(-scores, kind="stable") if j != left_out]
        assert [h[0] for h in hits] == allowed[:10]
        assert [h[1] for h in hits] == pytest.approx(scores[allowed[:10]].tolist())


BAD_CASES = [
    ("corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d1", "text": "y"}\n', 2, "duplicate _id 'd1'"),
    ("corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": 3}\n', 2, "'text' must be a string"),
    ("corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d2"\n', 2, "invalid JSON"),
    ("corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"title": "t", "text": "y"}\n', 2, "missing field '_id'"),
    ("queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n', 2, "duplicate _id 'q1'"),
    ("queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "  "}\n', 2, "empty text"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n", 3, "expected 3 tab-separated fields"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1.5\n", 2, "score must be an integer"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td1\t1\n", 3, "unknown query id 'q9'"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td9\t1\n", 2, "unknown document id 'd9'"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", 3, "judged twice"),
    ("qrels/test.tsv", "q1\td1\t1\n", 1, "expected the header"),
]


@pytest.mark.parametrize("name,content,line,match", BAD_CASES, ids=[c[3] for c in BAD_CASES])
def test_bad_input_names_file_and_line(tmp_path: Path, name: str, content: str, line: int, match: str) -> None:
    folder = write_beir(tmp_path / "bad", docs=[("d1", "", "x"), ("d2", "", "y")], queries=[("q1", "a")],
                        qrels=[("q1", "d1", 1)])
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(PromcseError, match=match) as err:
        read_beir(folder)
    assert err.value.path == str(folder / name) and err.value.line == line


def test_missing_split_names_the_splits_there(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "toy")
    with pytest.raises(PromcseError, match=r"no qrels for split 'dev' \(splits here: test\)"):
        read_beir(folder, "dev")


def evaluate_cached(folder: Path, cache: Path, spy: Spy) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*empty: they are never retrieved")
        return evaluate_retrieval(spy, spy, folder, cache=cache, fingerprint="toy-model", show_progress=False)


def test_cache_hit_miss_and_corrupt_entry(tmp_path: Path) -> None:
    folder, cache = write_beir(tmp_path / "toy"), tmp_path / "cache"
    first, spy = evaluate_cached(folder, cache, Spy()), Spy()
    second = evaluate_cached(folder, cache, spy)
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert len(spy.calls) == 1 and spy.calls[0][0] == "a red dog"  # only the queries were encoded
    assert second["per_query"] == first["per_query"]
    [npy] = cache.glob("*.npy")
    record = json.loads(npy.with_suffix(".json").read_text())
    assert record["shape"] == [6, 2] and record["parts"]["model"] == "toy-model"
    npy.write_bytes(npy.read_bytes()[:-8])  # a truncated vector file
    spy = Spy()
    with pytest.warns(UserWarning, match="damaged"):
        third = evaluate_cached(folder, cache, spy)
    assert third["cache"] == "recomputed" and len(spy.calls) == 2 and third["per_query"] == first["per_query"]
    assert evaluate_cached(folder, cache, Spy())["cache"] == "hit"
    npy.with_suffix(".json").write_text("{not json")
    with pytest.warns(UserWarning, match="damaged"):
        assert evaluate_cached(folder, cache, Spy())["cache"] == "recomputed"
    changed = write_beir(tmp_path / "toy2", docs=[*DOCS, ("d8", "", "red ball")])
    spy = Spy()
    assert evaluate_cached(changed, cache, spy)["cache"] == "miss" and len(spy.calls) == 2
    assert len(list(cache.glob("*.npy"))) == 2


def test_cache_key_parts_and_no_fingerprint_means_no_cache(tmp_path: Path) -> None:
    from promcse.evaluation.embedding_cache import cache_parts

    base = cache_parts("m", "c" * 64, "rule", 256)
    assert len({cache_key(base), cache_key({**base, "model": "n"}), cache_key({**base, "max_length": 128}),
                cache_key({**base, "corpus_sha256": "d" * 64})}) == 4
    folder, cache = write_beir(tmp_path / "toy"), tmp_path / "cache"
    with pytest.warns(UserWarning):
        result = evaluate_retrieval(Spy(), Spy(), folder, cache=cache, show_progress=False)
    assert result["cache"] == "off" and not cache.exists()


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from promcse.evaluation.embedding_cache import default_cache_dir

    monkeypatch.delenv("PROMCSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "promcse" / "embeddings"
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "pc"))
    assert default_cache_dir() == tmp_path / "pc" / "embeddings"


TINY_DOCS = [("a", "", "a man is playing guitar"), ("b", "dog", "the dog runs in the park"),
             ("c", "", "two children are reading a book"), ("d", "", "a woman is eating food")]
TINY_QUERIES = [("q1", "man playing guitar"), ("q2", "children reading"), ("q3", "dog in park")]
TINY_QRELS = [("q1", "a", 1), ("q2", "c", 2), ("q2", "b", 1), ("q3", "b", 1)]


def test_document_fingerprint_keys_on_the_document_side(tiny_bert: Path, tmp_path: Path) -> None:
    from promcse.models.loading import load

    frozen, again = load(str(tiny_bert), device="cpu"), load(str(tiny_bert), device="cpu")
    prompted = load(str(make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")), device="cpu")
    assert document_fingerprint(frozen) == document_fingerprint(again) != document_fingerprint(prompted)
    assert document_fingerprint(frozen, max_length=8) != document_fingerprint(frozen)
    folder, cache = write_beir(tmp_path / "tiny", TINY_DOCS, TINY_QUERIES, TINY_QRELS), tmp_path / "cache"
    base = evaluate_encoder(frozen, folder, cache=cache, show_progress=False)
    # A query-side-only prompt: queries through the prompt, documents through the frozen backbone's cache entry.
    asym = evaluate_encoder(prompted, folder, documents=again, cache=cache, show_progress=False)
    assert (base["cache"], asym["cache"]) == ("miss", "hit")
    assert evaluate_encoder(prompted, folder, cache=cache, show_progress=False)["cache"] == "miss"
    assert evaluate_encoder(frozen, folder, cache=cache, fingerprint="mine", show_progress=False)["cache"] == "miss"


def test_cli_eval_retrieval_then_compare(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_beir(tmp_path / "tiny", TINY_DOCS, TINY_QUERIES, TINY_QRELS)
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", "--model", str(tiny_bert), "--retrieval", str(folder), "--json", str(a), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "nDCG@10" in out and "tiny:test" in out and "Spearman" not in out  # only retrieval: no STS
    payload = json.loads(a.read_text())
    assert set(payload) == {"model", "retrieval"} and set(payload["retrieval"]["tiny:test"]["per_query"]) == {
        "q1", "q2", "q3"}
    assert main(["eval", "--model", str(ckpt), "--retrieval", f"{folder}:test", "--json", str(b), "--no-progress",
                 "--no-cache"]) == 0
    assert json.loads(b.read_text())["retrieval"]["tiny:test"]["cache"] == "off"
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--metric", "mrr@10", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "tiny:test" in out and "ndcg@10" in out and "mrr@10" in out and "p(boot)" in out


def test_cli_query_only_prompt_reuses_the_backbones_corpus_vectors(tiny_bert: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--documents: the prompt encodes the queries, the frozen backbone the documents, from its cache entry."""
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_beir(tmp_path / "tiny", TINY_DOCS, TINY_QUERIES, TINY_QRELS)
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    frozen, query_only = tmp_path / "frozen.json", tmp_path / "q.json"
    assert main(["eval", "--model", str(tiny_bert), "--retrieval", str(folder), "--json", str(frozen),
                 "--no-progress"]) == 0
    assert main(["eval", "--model", str(ckpt), "--documents", str(tiny_bert), "--retrieval", str(folder), "--json",
                 str(query_only), "--no-progress"]) == 0
    first = json.loads(frozen.read_text())["retrieval"]["tiny:test"]
    second = json.loads(query_only.read_text())["retrieval"]["tiny:test"]
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    from promcse.evaluation.retrieval import evaluate_encoder
    from promcse.models.loading import load

    fresh = evaluate_encoder(load(str(ckpt), device="cpu"), folder, documents=load(str(tiny_bert), device="cpu"),
                             cache=False, show_progress=False)
    assert fresh["metrics"] == pytest.approx(second["metrics"], abs=1e-9)  # cached corpus vectors, same answer


def test_cli_eval_keeps_sts_by_default_and_runs_both(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from promcse.cli import build_parser
    from promcse.cli.eval import _sts_plan

    parse = build_parser().parse_args
    assert _sts_plan(parse(["eval", "--model", "m"])) == ["stsb"]
    assert _sts_plan(parse(["eval", "--model", "m", "--retrieval", "x"])) is None
    assert _sts_plan(parse(["eval", "--model", "m", "--retrieval", "x", "--tasks", "stsb"])) == ["stsb"]
    assert _sts_plan(parse(["eval", "--model", "m", "--retrieval", "x", "--tsv", "f.tsv"])) == []
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_beir(tmp_path / "tiny", TINY_DOCS, TINY_QUERIES, TINY_QRELS)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_bert), "--tasks", "stsb", "--data-dir", str(tiny_data["data_dir"]),
                 "--retrieval", str(folder), "--json", str(out), "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    assert "STSBenchmark" in payload["tasks"] and payload["retrieval"]["tiny:test"]["cache"] == "miss"


def test_cli_bad_retrieval_input_exits_2_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_beir(tmp_path / "tiny", TINY_DOCS, TINY_QUERIES, [*TINY_QRELS, ("q1", "zz", 1)])
    assert main(["eval", "--model", "minilm", "--retrieval", str(folder), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'qrels' / 'test.tsv'}, line 6: unknown document id 'zz'" in err


def test_parse_retrieval(tmp_path: Path) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_retrieval("data/scifact") == ("data/scifact", "test")
    assert parse_retrieval("data/scifact:dev") == ("data/scifact", "dev")
    assert parse_retrieval(str(odd)) == (str(odd), "test")


def result_file(path: Path, per_query: dict[str, float], name: str = "toy:test") -> Path:
    rows = {q: {"ndcg@10": v, "mrr@10": v / 2} for q, v in per_query.items()}
    path.write_text(json.dumps({"model": path.stem, "retrieval": {name: {"per_query": rows}}}))
    return path


def test_compare_statistics_against_scipy_and_a_naive_bootstrap(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 100, 40).round(1)
    b = (a + rng.normal(3, 10, 40)).round(1)
    b[:5] = a[:5]  # ties
    ids = [f"q{i}" for i in range(40)]
    fa = result_file(tmp_path / "a.json", dict(zip(ids, a.tolist())))
    fb = result_file(tmp_path / "b.json", dict(zip(reversed(ids), reversed(b.tolist()))))  # order does not matter
    got = compare_mod.compare_results(fa, fb, ("ndcg@10", "mrr@10"), resamples=2000)["datasets"]["toy:test"]
    order = np.argsort(ids)  # queries are compared in sorted id order
    a, b = a[order], b[order]
    s = got["ndcg@10"]
    assert s["diff"] == pytest.approx(np.mean(b - a)) and s["n"] == 40
    assert s["t_pvalue"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert (s["wins"], s["ties"], s["losses"]) == (int(np.sum(b > a)), int(np.sum(b == a)), int(np.sum(b < a)))
    assert s["ties"] >= 5
    d = b - a
    rng = np.random.default_rng(0)
    means = [np.mean((d - d.mean())[rng.integers(0, 40, 40)]) for _ in range(2000)]
    naive = (1 + sum(abs(m) >= abs(d.mean()) - 1e-12 for m in means)) / 2001
    assert s["bootstrap_pvalue"] == pytest.approx(naive)
    assert got["mrr@10"]["diff"] == pytest.approx(s["diff"] / 2)


def test_compare_refuses_different_queries_and_several_models(tmp_path: Path) -> None:
    fa = result_file(tmp_path / "a.json", {"q1": 1.0, "q2": 2.0})
    fb = result_file(tmp_path / "b.json", {"q1": 1.0, "q3": 2.0})
    with pytest.raises(PromcseError, match=r"different query ids .*only in the first: \['q2'\]"):
        compare_mod.compare_results(fa, fb)
    (tmp_path / "list.json").write_text(json.dumps([{}, {}]))
    with pytest.raises(PromcseError, match="results of 2 models"):
        compare_mod.compare_results(fa, tmp_path / "list.json")
    other = result_file(tmp_path / "c.json", {"q1": 1.0}, name="other:test")
    with pytest.raises(PromcseError, match="no dataset in common"):
        compare_mod.compare_results(fa, other)
    same = compare_mod.compare_results(fa, fa)["datasets"]["toy:test"]["ndcg@10"]
    assert (same["t_pvalue"], same["bootstrap_pvalue"], same["ties"]) == (1.0, 1.0, 2)
