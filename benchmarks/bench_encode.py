"""Encode throughput: promcse vs sentence-transformers on all-MiniLM-L6-v2, same texts and batch size.

Both encoders run on the same backbone weights (the bundled ``minilm``), fp32, the same device, in one
process; each is timed on the same texts ``--repeats`` times after one warm-up pass and the median is
reported. The texts are a seeded sample of the STS suite's sentences (both columns of every TSV under
``<data>/tsv/original``). The last line printed is the JSON headline.

Usage:
    python benchmarks/bench_encode.py [--data-dir DIR] [--sample 2000] [--batch-size 64] [--repeats 3]

The data directory defaults to ``$PROMCSE_DATA_DIR``, then ``../shared/data/eval``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def sts_sentences(data_dir: Path) -> list[str]:
    """Both sentences of every pair in ``<data_dir>/tsv/original/*/*.tsv`` (header skipped, tab-split)."""
    texts: list[str] = []
    for path in sorted((data_dir / "tsv" / "original").glob("*/*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 2:
                texts.extend(f for f in fields[:2] if f.strip())
    if not texts:
        raise SystemExit(f"no STS sentences under {data_dir}/tsv/original")
    return texts


def default_data_dir() -> Path:
    """``$PROMCSE_DATA_DIR`` or the shared data folder next to the repository."""
    env = os.environ.get("PROMCSE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Median wall time over ``repeats`` runs after one warm-up; returns (seconds, last output)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    """Run the comparison and print per-library numbers, then the JSON headline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with tsv/original/<TASK>/*.tsv")
    parser.add_argument("--sample", type=int, default=2000, help="sentences to encode (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    import promcse
    from promcse.backbone import minilm_path

    texts = sts_sentences(args.data_dir or default_data_dir())
    if args.sample and args.sample < len(texts):
        texts = random.Random(0).sample(texts, args.sample)
    ours = promcse.load("minilm", device=args.device)
    peer = SentenceTransformer(str(minilm_path()), device=args.device)
    bs = args.batch_size
    t_ours, v_ours = timed(lambda: ours.encode(texts, batch_size=bs, normalize=False), args.repeats)
    t_peer, v_peer = timed(
        lambda: peer.encode(texts, batch_size=bs, normalize_embeddings=False, convert_to_numpy=True), args.repeats
    )
    diff = float(np.abs(np.asarray(v_ours) - np.asarray(v_peer)).max())
    print(f"texts={len(texts)} batch_size={bs} device={args.device} threads={torch.get_num_threads()}")
    print(f"promcse:               {len(texts) / t_ours:8.1f} sentences/s (median {t_ours:.2f}s)")
    print(f"sentence-transformers: {len(texts) / t_peer:8.1f} sentences/s (median {t_peer:.2f}s)")
    print(json.dumps({"speedup_vs_sentence_transformers": round(t_peer / t_ours, 3), "max_abs_diff": diff,
                      "texts": len(texts), "batch_size": bs, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
