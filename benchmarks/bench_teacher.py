"""Encode speed of the distillation teacher (all-mpnet-base-v2) against the student backbone (all-MiniLM-L6-v2)
and a distilled prompt on it, same texts, batch size and threads, rounds interleaved.

Usage (from the repository root, after experiments/fetch_mpnet.sh):
    python benchmarks/bench_teacher.py [--sample 2000] [--threads 2] [--prompt checkpoints/promcse-minilm-sup-snli]

Prints one line per model and, last, one JSON line with texts/s and the teacher/student ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sts_texts(data_dir: Path, sample: int, seed: int = 0) -> list[str]:
    """Distinct sentences of the STS test files (a seeded sample)."""
    from promcse.io.data import read_sts_tsv

    texts: set[str] = set()
    for path in sorted((data_dir / "tsv" / "original").rglob("*.tsv")):
        pairs = read_sts_tsv(path, min_rows=1)
        texts.update(pairs.sentence1 + pairs.sentence2)
    ordered = sorted(texts)
    random.Random(seed).shuffle(ordered)
    return ordered[:sample]


def main() -> None:
    import promcse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher", default=str(ROOT / "experiments" / "models" / "all-mpnet-base-v2"))
    parser.add_argument("--prompt", default=str(ROOT / "checkpoints" / "promcse-minilm-sup-snli"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "eval"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = sts_texts(Path(args.data_dir), args.sample)
    models = {"minilm": promcse.load("minilm", device="cpu"), "prompt": promcse.load(args.prompt, device="cpu"),
              "teacher": promcse.load(args.teacher, device="cpu")}
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.encode(texts, batch_size=args.batch_size)
            times[name].append(time.perf_counter() - start)
    rates = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name:8s} {rate:8.1f} texts/s (median of {args.repeats})")
    print(json.dumps({"texts": len(texts), "threads": args.threads, "batch_size": args.batch_size,
                      "texts_per_s": {k: round(v, 1) for k, v in rates.items()},
                      "teacher_vs_minilm": round(rates["teacher"] / rates["minilm"], 3),
                      "teacher_vs_prompt": round(rates["teacher"] / rates["prompt"], 3)}))


if __name__ == "__main__":
    main()
