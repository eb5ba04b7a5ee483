"""Encode throughput: promcse vs sentence-transformers on all-MiniLM-L6-v2, same texts and batch size.

Both encoders run on the same backbone weights (the bundled ``minilm``), fp32, the same device, in one
process, both L2-normalising (the model's sentence-transformers pipeline ends in Normalize); each is timed
on the same texts ``--repeats`` times, the runs interleaved, and the median is reported. The texts are a
seeded sample (``--sample 0``: all) of the 37,700 sentences of the 7 STS test sets under
``<data>/tsv/original``. The last line printed is the JSON headline.

Usage:
    python benchmarks/bench_encode.py [--data-dir DIR] [--sample 2000] [--batch-size 64] [--repeats 3]
        [--threads N] [--with-prototype]

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
from typing import Any, Callable

import numpy as np
import torch

TEST_FILES = ("STS12/*.tsv", "STS13/*.tsv", "STS14/*.tsv", "STS15/*.tsv", "STS16/*.tsv", "STSBenchmark/test.tsv",
              "SICK/test.tsv")  # the 7-task STS suite: 18,850 pairs, 37,700 sentences


def sts_sentences(data_dir: Path) -> list[str]:
    """Both sentences of every pair of the 7 STS test sets under ``<data_dir>/tsv/original`` (tab-split)."""
    texts: list[str] = []
    root = data_dir / "tsv" / "original"
    for path in sorted(p for pattern in TEST_FILES for p in root.glob(pattern)):
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


def encode_token_sorted(encoder: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """Prototype of a faster ``encode``: tokenize once, sort by *token* length, pad each batch itself.

    ``promcse`` and sentence-transformers both sort by character length, which leaves ~40% padding on the
    STS suite at batch 64; sorting by token length leaves <1%. Same model call, same numbers.
    """
    pad_id = encoder.tokenizer.pad_token_id or 0
    tokens = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)
    order = np.argsort([-len(ids) for ids in tokens["input_ids"]], kind="stable")
    out = torch.empty(len(texts), encoder.dim)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = {}
            for key in tokens.keys():
                seqs = [torch.tensor(tokens[key][i]) for i in rows]
                fill = pad_id if key == "input_ids" else 0
                batch[key] = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=fill)
            out[torch.as_tensor(rows)] = torch.nn.functional.normalize(encoder(batch).float(), dim=-1)
    return out.numpy()


def interleaved(fns: dict[str, Callable[[], np.ndarray]],
                repeats: int) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """Median wall and process-CPU seconds per function over ``repeats`` rounds; each round runs every function
    once, in turn, so that load from other processes affects all of them alike (CPU time is the fairer
    measure on a shared machine: it counts only this process's work)."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = np.asarray(fn())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return ({n: statistics.median(t) for n, t in wall.items()}, {n: statistics.median(t) for n, t in cpu.items()},
            outputs)


def main() -> None:
    """Run the comparison and print per-library numbers, then the JSON headline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with tsv/original/<TASK>/*.tsv")
    parser.add_argument("--sample", type=int, default=2000, help="sentences to encode (0: all 37,700)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 gives stable numbers on a busy machine")
    parser.add_argument("--with-prototype", action="store_true", help="also time the token-sorted prototype")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    import promcse
    from promcse.backbone import minilm_path

    texts = sts_sentences(args.data_dir or default_data_dir())
    if args.sample and args.sample < len(texts):
        texts = random.Random(0).sample(texts, args.sample)
    ours = promcse.load("minilm", device=args.device)
    peer = SentenceTransformer(str(minilm_path()), device=args.device)  # Transformer + mean Pooling + Normalize
    bs = args.batch_size
    fns: dict[str, Callable[[], np.ndarray]] = {
        "promcse": lambda: ours.encode(texts, batch_size=bs, normalize=True),
        "sentence-transformers": lambda: peer.encode(texts, batch_size=bs, normalize_embeddings=True),
    }
    if args.with_prototype:
        fns["promcse token-sorted prototype"] = lambda: encode_token_sorted(ours, texts, bs)
    warm = texts[:256]  # warm-up (first-call allocations, lazy inits)
    ours.encode(warm, batch_size=bs)
    peer.encode(warm, batch_size=bs)
    seconds, cpu, outputs = interleaved(fns, args.repeats)
    print(f"texts={len(texts)} batch_size={bs} device={args.device} threads={torch.get_num_threads()} "
          f"load average={os.getloadavg()[0]:.1f}")
    for name, sec in seconds.items():
        print(f"{name:<32} {len(texts) / sec:8.1f} sentences/s (median of {args.repeats}: {sec:.2f}s wall, "
              f"{cpu[name]:.2f}s CPU)")
    reference = outputs["sentence-transformers"]
    headline: dict[str, Any] = {
        "speedup_vs_sentence_transformers": round(seconds["sentence-transformers"] / seconds["promcse"], 3),
        "max_abs_diff": float(np.abs(outputs["promcse"] - reference).max()),
        "cpu_time_speedup": round(cpu["sentence-transformers"] / cpu["promcse"], 3),
        "texts": len(texts), "batch_size": bs, "repeats": args.repeats}
    if args.with_prototype:
        proto = "promcse token-sorted prototype"
        headline["prototype_speedup"] = round(seconds["sentence-transformers"] / seconds[proto], 3)
        headline["prototype_cpu_time_speedup"] = round(cpu["sentence-transformers"] / cpu[proto], 3)
        headline["prototype_max_abs_diff"] = float(np.abs(outputs[proto] - reference).max())
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
