"""Index kinds on MiniLM-like vectors: recall@10 against exact search, queries/s, build time, bytes per vector.

The vectors are made from real all-MiniLM-L6-v2 embeddings (bundled model) of the bundled STS-B dev/test
sentences (~5,000 distinct): each of the ``--n`` corpus vectors and ``--queries`` query vectors is a convex
mixture of ``--mix`` random real vectors (Dirichlet(1) weights) plus Gaussian noise of scale
``--noise / sqrt(D)``, renormalised. Queries are fresh mixtures, not corpus members. Ground truth is the
exact inner-product top 10.

Every kind is built the way ``promcse index build --from-vectors`` builds it: the vectors are written as
float32 shards (``--shard-size`` rows) and :func:`promcse.search.build_from_vectors` trains on a sample
(``--train-size``) and adds shard by shard. Reported per kind: build seconds, queries/s (one batched
search call over all queries, ``--threads`` FAISS threads), recall@10, and bytes per vector of the saved
``index.faiss``; the compressed kinds also read their rescoring candidates from the shards (4·D bytes per
vector on disk, memory-mapped), reported as ``store_bytes_per_vector``.

Usage:
    python benchmarks/bench_index.py [--n 100000] [--queries 1000] [--threads 1] [--kinds flat ivf ...]

The last line printed is the JSON headline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

# (label, kind, build settings, search settings)
VARIANTS: list[tuple[str, str, dict, dict]] = [
    ("flat", "flat", {}, {}),
    ("ivf", "ivf", {"nprobe": 16}, {}),
    ("ivf-nprobe64", "ivf", {"nprobe": 16}, {"nprobe": 64}),
    ("ivfpq", "ivfpq", {"nprobe": 16}, {"rescore": 100}),
    ("ivfpq-norescore", "ivfpq", {"nprobe": 16}, {"rescore": 0}),
    ("hnsw", "hnsw", {"hnsw_m": 32, "ef_search": 64}, {}),
    ("int8", "int8", {}, {"rescore": 0}),
    ("binary", "binary", {}, {"rescore": 100}),
    ("binary-rescore500", "binary", {}, {"rescore": 500}),
    ("binary-norescore", "binary", {}, {"rescore": 0}),
]


def sts_sentences() -> list[str]:
    """Distinct sentences of the bundled STS-B dev and test files."""
    from importlib import resources

    root = Path(str(resources.files("promcse") / "resources" / "data" / "sts"))
    texts: list[str] = []
    for name in ("dev.tsv", "test.tsv"):
        for line in (root / name).read_text(encoding="utf-8").splitlines()[1:]:
            texts.extend(f.strip() for f in line.split("\t")[:2] if f.strip())
    return list(dict.fromkeys(texts))


def real_vectors(model: str, batch_size: int) -> np.ndarray:
    import promcse

    encoder = promcse.load(model, device="cpu")
    return np.asarray(encoder.encode(sts_sentences(), batch_size=batch_size, normalize=True), dtype=np.float32)


def mixtures(real: np.ndarray, n: int, mix: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors, each a Dirichlet-weighted mixture of ``mix`` real vectors plus small noise."""
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        picks = rng.integers(0, len(real), size=(m, mix))
        weights = rng.dirichlet(np.ones(mix), size=m).astype(np.float32)
        block = np.einsum("nk,nkd->nd", weights, real[picks])
        block += rng.normal(scale=noise / np.sqrt(real.shape[1]), size=block.shape).astype(np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_top10(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best = []
    for start in range(0, len(queries), 256):
        scores = queries[start:start + 256] @ base.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        best.append(top)
    return np.concatenate(best)


def write_shards(root: Path, vectors: np.ndarray, shard_size: int) -> Path:
    from promcse.shards import FORMAT, FORMAT_VERSION, write_manifest, write_shard

    root.mkdir(parents=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "minilm", "dim": vectors.shape[1],
                "dtype": "float32", "normalize": True, "shard_size": shard_size, "with_texts": False,
                "input": {"synthetic": True}, "part": None, "complete": True, "total_rows": len(vectors),
                "shards": []}
    for number, start in enumerate(range(0, len(vectors), shard_size)):
        chunk = vectors[start:start + shard_size]
        manifest["shards"].append(write_shard(root, number, start, chunk, list(range(start, start + len(chunk))),
                                              None, "float32"))
    manifest["num_shards"] = len(manifest["shards"])
    write_manifest(root, manifest)
    return root


def measure(root: Path, out: Path, kind: str, build: dict, search: dict, queries: np.ndarray,
            truth: np.ndarray, train_size: int) -> dict:
    from promcse.search import FAISS_FILE, build_from_vectors

    start = time.perf_counter()
    index = build_from_vectors(root, kind=kind, train_size=train_size, **build)
    built = time.perf_counter() - start
    index.search_vectors(queries[:8], top_k=10, **search)  # warm-up
    start = time.perf_counter()
    hits = index.search_vectors(queries, top_k=10, **search)
    seconds = time.perf_counter() - start
    recall = float(np.mean([len(set(t) & {h.id for h in row}) / 10 for t, row in zip(truth, hits)]))
    index.save(out)
    n, dim = len(index), int(index.dim or 0)
    return {"kind": kind, "build_s": round(built, 2), "queries_per_s": round(len(queries) / seconds, 1),
            "recall_at_10": round(recall, 4), "bytes_per_vector": round((out / FAISS_FILE).stat().st_size / n, 1),
            "store_bytes_per_vector": 4 * dim if kind in ("ivfpq", "int8", "binary") else 0,
            "settings": {**build, **search, "nlist": index.nlist, "pq_m": index.params.pq_m,
                         "pq_bits": index.params.pq_bits}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="corpus vectors")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--mix", type=int, default=3, help="real vectors per mixture")
    parser.add_argument("--noise", type=float, default=0.1, help="noise norm before renormalising")
    parser.add_argument("--shard-size", type=int, default=20_000)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1, help="FAISS (OpenMP) threads")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--kinds", nargs="+", help="labels to run (default: all of " +
                        ", ".join(v[0] for v in VARIANTS) + ")")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(max(args.threads, 1))
    rng = np.random.default_rng(args.seed)
    real = real_vectors(args.model, 64)
    base = mixtures(real, args.n, args.mix, args.noise, rng)
    queries = mixtures(real, args.queries, args.mix, args.noise, rng)
    truth = exact_top10(base, queries)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shards(Path(tmp) / "vectors", base, args.shard_size)
        del base
        for label, kind, build, search in VARIANTS:
            if args.kinds and label not in args.kinds:
                continue
            row = {"label": label, **measure(root, Path(tmp) / label, kind, build, search, queries, truth,
                                             args.train_size)}
            rows.append(row)
            print(f"{label:<18} recall@10 {row['recall_at_10']:.3f}  {row['queries_per_s']:>9.1f} q/s  "
                  f"build {row['build_s']:>7.2f}s  {row['bytes_per_vector']:>7.1f} B/vector", flush=True)
    print(json.dumps({"n": args.n, "queries": args.queries, "dim": int(real.shape[1]), "real_vectors": len(real),
                      "mix": args.mix, "noise": args.noise, "threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()
