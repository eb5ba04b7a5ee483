"""The "Domain retrieval" table of docs/RESULTS.md: frozen, BM25, and query-side adaptation on SciFact and NFCorpus.

Every trained row is selected on a dev split (SciFact: 20 % of its train queries, carved by a hash of their ids;
NFCorpus: its dev split) and reported on test. Query-side rows keep the frozen backbone's document vectors (one
cached encode of each corpus, shared by every row), so the index never changes. Results (the ``promcse eval --json``
shape, so ``promcse compare A B`` reads them) go to experiments/results/retrieval/<dataset>-<row>-s<seed>.json;
a (dataset, row, seed) already there is skipped. ``--report`` prints the markdown table from those files.

Usage (repository root, ../shared beside it; one heavy job on the box at a time):
    python experiments/domain_retrieval.py [--datasets scifact,nfcorpus] [--rows frozen,bm25,prompt,lora,full,corpus]
        [--seeds 42,43,44]
    python experiments/domain_retrieval.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PROMCSE_RETRIEVAL_DIR", ROOT.parent / "shared" / "data" / "retrieval"))
RESULTS = ROOT / "experiments" / "results" / "retrieval"
DEV_SPLIT = {"scifact": None, "nfcorpus": "dev"}  # None: carve 20 % of train
TRAINED = ("both", "prompt", "lora", "full", "corpus", "corpus_title", "corpus_sentence", "prompt_eh")
LABELS = {"frozen": "frozen all-MiniLM-L6-v2", "bm25": "BM25 (bm25s, English stemmer)",
          "prompt": "query prompt, labels (P=20)", "both": "one prompt for queries and documents, labels", "prompt_eh": "query prompt, labels, + EH (w=1)",
          "lora": "query LoRA, labels (r=10, PEFT)", "full": "query tower fully fine-tuned, labels",
          "corpus": "query prompt, corpus only (titles + sentences)",
          "corpus_title": "query prompt, corpus only (titles)", "corpus_sentence": "query prompt, corpus only (sentences)"}


def _setup() -> Any:
    from promcse.training.adapt import AdaptSetup

    return AdaptSetup(backbone="minilm", document_max_length=256, cache=True, show_progress=False)


# Chosen on dev only (experiments/domain_sweep.py; docs/RESULTS.md "Choosing the recipe"): SciFact (about one
# relevant document a query) takes a sharper softmax; NFCorpus (dozens a query) collapses with it.
TUNED: dict[str, dict[str, float]] = {"scifact": {"lr": 2e-2, "temperature": 0.02}, "nfcorpus": {}}


def _config(dataset: str, row: str, seed: int) -> Any:
    from promcse.training.query_side import QueryTuneConfig

    mode = row if row in ("lora", "full") else "prompt"
    if row.startswith("corpus"):
        return QueryTuneConfig(mode="prompt", epochs=3, patience=0, seed=seed)
    tuned = TUNED[dataset] if mode == "prompt" else {k: v for k, v in TUNED[dataset].items() if k != "lr"}
    return QueryTuneConfig(mode=mode, seed=seed, eh_weight=1.0 if row == "prompt_eh" else 0.0, **tuned)


def _artifact_bytes(encoder: Any) -> int:
    import safetensors.torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in encoder.trainable_tensors().items()},
                                    str(path))
        return path.stat().st_size


def _test_result(encoder: Any, dataset: str) -> dict[str, Any]:
    from promcse.evaluation.beir import read_beir
    from promcse.evaluation.retrieval import score_vectors
    from promcse.training.adapt import frozen_corpus

    test = read_beir(DATA / dataset, "test")
    corpus = frozen_corpus(test, _setup())
    vectors = encoder.encode(test.query_texts, batch_size=128, show_progress=False, max_length=256)
    return score_vectors(test, np.asarray(vectors, dtype=np.float32), corpus)


def run_trained(dataset: str, row: str, seed: int, ship: bool = False) -> dict[str, Any]:
    """Train one query-side row on ``dataset`` and evaluate it on test; with ``ship``, save the labelled query
    prompt as checkpoints/promcse-minilm-<dataset>-query."""
    from promcse.training.adapt import adapt_corpus, adapt_labelled

    config, setup = _config(dataset, row, seed), _setup()
    if row.startswith("corpus"):
        signal = {"corpus": "auto", "corpus_title": "title", "corpus_sentence": "sentence"}[row]
        dev = (DATA / dataset, DEV_SPLIT[dataset] or "train")
        encoder, fit = adapt_corpus(DATA / dataset, None, signal, config, setup, dev=dev)
    else:
        output = ROOT / "checkpoints" / f"promcse-minilm-{dataset}-query" if ship and row == "prompt" else None
        if output is not None:  # a role pair directory holds only its own files until results.json is rewritten
            (output / "results.json").unlink(missing_ok=True)
        encoder, fit = adapt_labelled(DATA / dataset, output, "train", DEV_SPLIT[dataset], 0.2, config, setup)
    result = _test_result(encoder.eval(), dataset)
    result["facts"] = {"trainable": fit.trainable, "artifact_bytes": _artifact_bytes(encoder),
                       "train_seconds": round(fit.seconds, 1), "rebuild_index": False, "best_dev": fit.best_dev,
                       "best_epoch": fit.best_epoch, "history": fit.history, "train_loss": fit.train_loss, "config": asdict(config)}
    return result


BOTH_MAX_PAIRS = 1000  # both-roles training re-encodes 256-token documents every step: a CPU budget, see RESULTS


def run_both(dataset: str, seed: int) -> dict[str, Any]:
    """One prompt for queries and documents (documents re-encoded), trained by ``promcse train`` on the labelled
    pairs with one mined hard negative each; the last step is kept (a dev evaluation re-encodes the corpus)."""
    import random

    from promcse.evaluation.beir import read_beir
    from promcse.evaluation.retrieval import evaluate_encoder
    from promcse.models.loading import load
    from promcse.training.adapt import carve_dev, write_labelled_pairs
    from promcse.training.config import load_config
    from promcse.training.train import train

    data = read_beir(DATA / dataset, "train")
    if DEV_SPLIT[dataset] is None:
        data = carve_dev(data, 0.2)[0]
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        write_labelled_pairs(DATA / dataset, pairs, setup=_setup(), data=data)
        lines = pairs.read_text(encoding="utf-8").splitlines()
        random.Random(seed).shuffle(lines)
        pairs.write_text("\n".join(lines[:BOTH_MAX_PAIRS]) + "\n", encoding="utf-8")
        config = load_config(None, [
            "model.prompt_length=10", "model.shift_positions=false", "model.pooler=avg", "model.head=none",
            f"data.train_file={pairs}", "data.max_length=256", "loss.name=nt_xent", "train.batch_size=32",
            "train.lr=5e-3", "train.epochs=1", "train.eval_every=-1", f"train.seed={seed}"])
        start = time.time()
        train(config, Path(tmp) / "run", show_progress=False)
        seconds = time.time() - start
        encoder = load(str(Path(tmp) / "run"), device="cpu")
        result = evaluate_encoder(encoder, DATA / dataset, "test", max_length=256, cache=False, show_progress=False)
        result["facts"] = {"trainable": sum(t.numel() for t in encoder.trainable_tensors().values()),
                           "artifact_bytes": _artifact_bytes(encoder), "train_seconds": round(seconds, 1),
                           "rebuild_index": True, "pairs": min(len(lines), BOTH_MAX_PAIRS)}
    return result


def run_frozen(dataset: str) -> dict[str, Any]:
    from promcse.training.adapt import frozen_encoder

    result = _test_result(frozen_encoder(_setup()), dataset)
    result["facts"] = {"trainable": 0, "artifact_bytes": 0, "train_seconds": 0.0, "rebuild_index": False}
    return result


def run_bm25(dataset: str) -> dict[str, Any]:
    """BM25 from bm25s (Lucene's formula, k1 = 1.5, b = 0.75), English stopwords and Snowball stemmer."""
    import bm25s
    import Stemmer

    from promcse.evaluation.beir import read_beir
    from promcse.evaluation.retrieval import _summary, score_run

    test = read_beir(DATA / dataset, "test")
    stemmer = Stemmer.Stemmer("english")
    kept = [i for i, text in enumerate(test.doc_texts) if text]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([test.doc_texts[i] for i in kept], stopwords="en", stemmer=stemmer,
                                   show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(test.query_texts, stopwords="en", stemmer=stemmer, show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=min(1000, len(kept)), show_progress=False)
    run = {q: {test.doc_ids[kept[int(d)]]: float(s) for d, s in zip(row_d, row_s) if test.doc_ids[kept[int(d)]] != q}
           for q, row_d, row_s in zip(test.query_ids, docs, scores)}
    result = _summary(test, score_run(test.qrels, run), 1000, "off", True)
    result["facts"] = {"trainable": 0, "artifact_bytes": 0, "train_seconds": 0.0, "rebuild_index": True}
    return result


def run_one(dataset: str, row: str, seed: int, ship: bool = False) -> Path:
    out = RESULTS / f"{dataset}-{row}-s{seed}.json"
    if out.exists():
        print(f"skip {out.name} (exists)")
        return out
    start = time.time()
    if row == "frozen":
        result = run_frozen(dataset)
    elif row == "bm25":
        result = run_bm25(dataset)
    elif row == "both":
        result = run_both(dataset, seed)
    else:
        result = run_trained(dataset, row, seed, ship)
    payload = {"model": row, "seed": seed, "seconds": round(time.time() - start, 1),
               "retrieval": {f"{dataset}:test": result}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    m = result["metrics"]
    print(f"{dataset} {row} s{seed}: nDCG@10 {m['ndcg@10']:.2f}  R@100 {m['recall@100']:.2f}  "
          f"({payload['seconds']} s)", flush=True)
    return out


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report() -> str:
    """The markdown table: mean ± sd over seeds, per dataset and row."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        payload = json.loads(path.read_text())
        (key, result), = payload["retrieval"].items()
        rows.setdefault((key.split(":")[0], payload["model"]), []).append(result)
    lines = ["| dataset | row | seeds | nDCG@10 | Recall@100 | trainable params | artifact | train s | "
             "index rebuilt |", "|---|---|---|---|---|---|---|---|---|"]
    for (dataset, row), results in sorted(rows.items(), key=lambda kv: (kv[0][0], list(LABELS).index(kv[0][1]))):
        facts = results[0]["facts"]
        size = facts["artifact_bytes"]
        lines.append(f"| {dataset} | {LABELS[row]} | {len(results)} | "
                     f"{_cell([r['metrics']['ndcg@10'] for r in results])} | "
                     f"{_cell([r['metrics']['recall@100'] for r in results])} | {facts['trainable']:,} | "
                     f"{size / 2**20:.2f} MiB | {statistics.mean(r['facts']['train_seconds'] for r in results):.0f} | "
                     f"{'yes' if facts['rebuild_index'] else 'no'} |")
    return "\n".join(lines)


def write_ship_results(dataset: str, seed: int = 42) -> Path:
    """checkpoints/promcse-minilm-<dataset>-query/results.json: the shipped seed's test metrics beside the frozen
    backbone's, from the stored result files."""
    def metrics(row: str, s: int) -> dict[str, float]:
        payload = json.loads((RESULTS / f"{dataset}-{row}-s{s}.json").read_text())
        return payload["retrieval"][f"{dataset}:test"]["metrics"]

    out = ROOT / "checkpoints" / f"promcse-minilm-{dataset}-query" / "results.json"
    record = {"dataset": f"{dataset}:test", "test": metrics("prompt", seed), "frozen_test": metrics("frozen", 0),
              "documents": "frozen all-MiniLM-L6-v2, 256 tokens (unchanged index)",
              "command": f"python experiments/domain_retrieval.py --datasets {dataset} --rows frozen,prompt "
                         f"--seeds {seed} --ship"}
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scifact,nfcorpus")
    parser.add_argument("--rows", default="frozen,bm25,prompt,lora,full,corpus")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--report", action="store_true", help="print the table from the stored results")
    parser.add_argument("--ship", action="store_true", help="save the first seed's labelled query prompt under "
                        "checkpoints/")
    args = parser.parse_args(argv)
    if args.report:
        print(report())
        return 0
    for dataset in args.datasets.split(","):
        for row in args.rows.split(","):
            seeds = [int(s) for s in args.seeds.split(",")] if row in TRAINED else [0]
            for seed in seeds:
                run_one(dataset, row, seed, args.ship and seed == seeds[0])
            if args.ship and row == "prompt":
                write_ship_results(dataset, seeds[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
