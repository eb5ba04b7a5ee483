"""Time the 7-task STS evaluation of `minilm`: promcse vs a plain sentence-transformers loop, in one run.

The peer is what users write with sentence-transformers: for every sub-file, encode sentence1 and
sentence2 (batch 32, the library default), cosine, Spearman; "all" over concatenated sub-files.
promcse encodes each distinct sentence of the suite once, in length-sorted batches.

Usage: python benchmarks/bench_eval.py [--data-dir ../shared/data/eval] [--repeats 1]
Last line: JSON {"speedup_vs_sentence_transformers": ..., "avg": ..., "peer_avg": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from promcse.io.data import read_sts_tsv
from promcse.evaluation.sts import STANDARD_TASKS, TASKS, evaluate, task_files


def peer_eval(model: object, data_dir: Path) -> dict[str, float]:
    """Plain sentence-transformers evaluation: encode both sides of every file, per task 'all' Spearman."""
    scores: dict[str, float] = {}
    for task in STANDARD_TASKS:
        preds, golds = [], []
        for path in task_files(task, data_dir):
            pairs = read_sts_tsv(path)
            a = model.encode(pairs.sentence1, normalize_embeddings=True)  # type: ignore[attr-defined]
            b = model.encode(pairs.sentence2, normalize_embeddings=True)  # type: ignore[attr-defined]
            preds.append((a * b).sum(axis=1))
            golds.append(np.asarray(pairs.scores))
        scores[TASKS[task].report] = 100 * spearmanr(np.concatenate(preds), np.concatenate(golds)).correlation
    scores["avg"] = float(np.mean(list(scores.values())))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("PROMCSE_DATA_DIR", "../shared/data/eval"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    data_dir = Path(args.data_dir)

    import promcse
    from promcse.encoder.backbone import minilm_path
    from sentence_transformers import SentenceTransformer

    ours_model = promcse.load("minilm", device="cpu")
    peer_model = SentenceTransformer(str(minilm_path()), device="cpu")
    ours_times, peer_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = evaluate(lambda t: ours_model.encode(t, batch_size=128), "all", data_dir)
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        peer = peer_eval(peer_model, data_dir)
        peer_times.append(time.perf_counter() - start)
    rows = [(name, ours["tasks"][name]["spearman"], peer[name]) for name in peer if name != "avg"]
    for name, a, b in rows:
        print(f"{name:14s} promcse {a:6.2f}   sentence-transformers {b:6.2f}   diff {a - b:+.3f}")
    t_ours, t_peer = statistics.median(ours_times), statistics.median(peer_times)
    print(f"time: promcse {t_ours:.1f}s, sentence-transformers {t_peer:.1f}s (median of {args.repeats})")
    print(json.dumps({"speedup_vs_sentence_transformers": round(t_peer / t_ours, 3), "avg": round(ours["avg"], 3),
                      "peer_avg": round(peer["avg"], 3), "seconds": round(t_ours, 2), "peer_seconds": round(t_peer, 2)}))


if __name__ == "__main__":
    main()
