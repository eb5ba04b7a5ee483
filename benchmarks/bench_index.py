"""Index kinds at corpus scale: recall@10 against exact search, queries/s, build time, bytes per vector.

**Vectors.** Every distinct sentence available here is encoded for real with the bundled all-MiniLM-L6-v2
(``--model``): the STS12-16, STS-B and SICK files of ``--data-root``/eval/tsv/senteval, the wiki1m head and the
SNLI dev/test premises and hypotheses of ``--data-root``/train, and the package's bundled training files
(about 50k sentences). ``--queries`` of them, drawn at random (``--seed``), are held out as the **real queries**
and never enter the corpus. The corpus is the other real vectors plus synthetic ones up to ``--n``: each a
convex mixture of ``--mix`` random real corpus vectors (Dirichlet(1) weights) plus Gaussian noise of norm about
``--noise``, renormalised. Mixtures keep the real vectors' structure (clusters, the anisotropy of the space);
plain random vectors would not, and every ANN index looks bad on them. Ground truth is the exact
inner-product top 10 of each query over the whole corpus. The real vectors are cached in ``--cache`` (keyed by
the sentences' and model's sha256) so a rerun skips the encoding.

**Builds.** Every kind is built the way ``promcse index build --from-vectors`` builds it: the corpus is written
as float32 shards (``--shard-size`` rows) and :func:`promcse.corpus.search.build_from_vectors` trains on a sample
(``--train-size``) and adds shard by shard. Each build is then searched with each of its search settings.
Reported per (build, search): build seconds, queries/s (one batched search call over all queries, ``--threads``
FAISS threads), recall@10, and bytes per vector of the saved ``index.faiss``; the compressed kinds also read
their rescoring candidates from the shards (4·D bytes per vector on disk, memory-mapped), reported as
``store_bytes_per_vector``. ``memory_vs_flat`` is flat's bytes per vector over the kind's (index file only).

Usage:
    python benchmarks/bench_index.py [--n 1000000] [--queries 1000] [--threads 1] [--kinds flat ivfpq ...]

The last line printed is the JSON headline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

Build = tuple[str, str, dict, list[tuple[str, dict]]]  # (label, kind, build settings, [(search label, settings)])

# (label, kind, build settings, [(search label, search settings), ...])
BUILDS: list[Build] = [
    ("flat", "flat", {}, [("flat", {})]),
    ("ivf", "ivf", {"nprobe": 16}, [("ivf", {}), ("ivf-nprobe64", {"nprobe": 64})]),
    ("ivfpq", "ivfpq", {"nprobe": 16}, [("ivfpq-norescore", {"rescore": 0}), ("ivfpq", {"rescore": 100}),
                                        ("ivfpq-nprobe32-rescore200", {"nprobe": 32, "rescore": 200})]),
    ("hnsw", "hnsw", {"hnsw_m": 32}, [("hnsw", {"ef_search": 64}), ("hnsw-ef128", {"ef_search": 128}),
                                      ("hnsw-ef160", {"ef_search": 160}), ("hnsw-ef192", {"ef_search": 192}),
                                      ("hnsw-ef256", {"ef_search": 256})]),
    ("int8", "int8", {}, [("int8", {"rescore": 0}), ("int8-rescore100", {"rescore": 100})]),
    ("binary", "binary", {}, [("binary-norescore", {"rescore": 0}), ("binary", {"rescore": 100}),
                              ("binary-rescore500", {"rescore": 500})]),
]


def tsv_columns(path: Path, columns: tuple[str, ...]) -> list[str]:
    """The named columns of a tab-separated file with a header row (split on tabs and \\n only)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    header = lines[0].rstrip("\r").split("\t")
    picks = [header.index(c) for c in columns]
    out: list[str] = []
    for line in lines[1:]:
        fields = line.rstrip("\r").split("\t")
        out.extend(fields[i].strip() for i in picks if i < len(fields) and fields[i].strip())
    return out


def available_sentences(data_root: Path) -> list[str]:
    """Every distinct sentence here: STS/SICK, wiki1m head, SNLI dev/test, the bundled training files."""
    from promcse.io.data import bundled_path

    texts: list[str] = []
    for path in sorted((data_root / "eval" / "tsv" / "senteval").glob("*/*.tsv")):
        texts += tsv_columns(path, ("sentence1", "sentence2"))
    texts += tsv_columns(data_root / "train" / "snli_devtest" / "snli_devtest_pairs.tsv", ("premise", "hypothesis"))
    for path in (data_root / "train" / "wiki1m_partial" / "wiki1m_head_11914.txt", bundled_path("wiki_5k.txt")):
        texts += [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return list(dict.fromkeys(texts))


def real_vectors(model: str, texts: list[str], batch_size: int, cache: Path) -> np.ndarray:
    """Normalised embeddings of ``texts``, cached under a key of the model name and the texts."""
    import promcse

    key = hashlib.sha256(("\n".join([model, *texts])).encode("utf-8")).hexdigest()[:16]
    path = cache / f"real-{key}.npy"
    if path.exists():
        return np.load(path)
    encoder = promcse.load(model, device="cpu")
    vectors = np.asarray(encoder.encode(texts, batch_size=batch_size, normalize=True, show_progress=True),
                         dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


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
    from promcse.corpus.shards import FORMAT, FORMAT_VERSION, write_manifest, write_shard

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


def build(root: Path, kind: str, settings: dict, train_size: int):
    """One ``build_from_vectors`` run; (index, seconds)."""
    from promcse.corpus.search import build_from_vectors

    start = time.perf_counter()
    index = build_from_vectors(root, kind=kind, train_size=train_size, **settings)
    return index, time.perf_counter() - start


def measure(index, search: dict, queries: np.ndarray, truth: np.ndarray) -> dict:
    """queries/s and recall@10 of one search setting."""
    index.search_vectors(queries[:8], top_k=10, **search)  # warm-up
    start = time.perf_counter()
    hits = index.search_vectors(queries, top_k=10, **search)
    seconds = time.perf_counter() - start
    recall = float(np.mean([len(set(t) & {h.id for h in row}) / 10 for t, row in zip(truth, hits)]))
    return {"queries_per_s": round(len(queries) / seconds, 1), "recall_at_10": round(recall, 4)}


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus vectors (real + synthetic)")
    parser.add_argument("--queries", type=int, default=1000, help="real sentences held out as queries")
    parser.add_argument("--mix", type=int, default=3, help="real vectors per synthetic mixture")
    parser.add_argument("--noise", type=float, default=0.1, help="noise norm before renormalising")
    parser.add_argument("--shard-size", type=int, default=50_000)
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1, help="FAISS (OpenMP) threads")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                        help="the shared data folder (default: ../shared/data beside the checkout)")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_index"), help="real-vector cache folder")
    parser.add_argument("--kinds", nargs="+", help="builds to run (default: all of " +
                        ", ".join(b[0] for b in BUILDS) + ")")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def set_threads(threads: int) -> None:
    """FAISS (OpenMP) threads; torch gets at least 2 for the encoding."""
    import faiss
    import torch

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(max(threads, 2))


def split_corpus(args: argparse.Namespace, real: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held-out queries, real corpus vectors, whole corpus): the real corpus vectors plus synthetic mixtures up
    to ``--n``, shuffled together."""
    order = rng.permutation(len(real))
    queries, corpus_real = real[order[:args.queries]], real[order[args.queries:]]
    base = np.concatenate([corpus_real, mixtures(corpus_real, args.n - len(corpus_real), args.mix, args.noise, rng)])
    base = base[rng.permutation(len(base))]  # real and synthetic vectors spread over every shard
    return queries, corpus_real, base


def result_row(label: str, kind: str, settings: dict, search: dict, index: Any, built: float, size: float,
               flat_bytes: float, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """One (build, search) row: its measurements, bytes per vector and settings; printed."""
    row = {"label": label, "kind": kind, "build_s": round(built, 1), **measure(index, search, queries, truth),
           "bytes_per_vector": round(size, 1), "memory_vs_flat": round(flat_bytes / size, 1),
           "store_bytes_per_vector": 4 * int(index.dim or 0) if kind in ("ivfpq", "int8", "binary") else 0,
           "settings": {**settings, **search, "nlist": index.nlist, "pq_m": index.params.pq_m,
                        "pq_bits": index.params.pq_bits}}
    print(f"{label:<26} recall@10 {row['recall_at_10']:.3f}  {row['queries_per_s']:>9.1f} q/s  "
          f"build {row['build_s']:>7.1f}s  {row['bytes_per_vector']:>7.1f} B/vector "
          f"({row['memory_vs_flat']}x less than flat)", flush=True)
    return row


def run_build(args: argparse.Namespace, tmp: Path, root: Path, build_spec: Build,
              queries: np.ndarray, truth: np.ndarray, flat_bytes: float) -> list[dict[str, Any]]:
    """Build one kind from the shards under ``root``, save it under ``tmp``, measure each of its searches."""
    name, kind, settings, searches = build_spec
    index, built = build(root, kind, settings, args.train_size)
    index.save(tmp / name)
    size = (tmp / name / "index.faiss").stat().st_size / len(index)
    return [result_row(label, kind, settings, search, index, built, size, flat_bytes, queries, truth)
            for label, search in searches]


def add_qps_vs_flat(rows: list[dict[str, Any]]) -> None:
    """Each row's queries/s over flat's (None without a flat row)."""
    flat_qps = next((r["queries_per_s"] for r in rows if r["label"] == "flat"), None)
    for row in rows:
        row["qps_vs_flat"] = round(row["queries_per_s"] / flat_qps, 1) if flat_qps else None


def main() -> None:
    """Encode the real vectors, make the corpus, build and search every kind, then print the JSON headline."""
    args = parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    texts = available_sentences(args.data_root)
    real = real_vectors(args.model, texts, 128, args.cache)
    queries, corpus_real, base = split_corpus(args, real, rng)
    truth = exact_top10(base, queries)
    print(f"{len(texts)} real sentences: {len(queries)} held-out queries, {len(corpus_real)} in a corpus of "
          f"{len(base)} vectors", flush=True)
    rows: list[dict[str, Any]] = []
    flat_bytes = 4.0 * real.shape[1]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shards(Path(tmp) / "vectors", base, args.shard_size)
        del base  # only the shards hold the corpus while the indexes are built
        for build_spec in BUILDS:
            if args.kinds and build_spec[0] not in args.kinds:
                continue
            rows += run_build(args, Path(tmp), root, build_spec, queries, truth, flat_bytes)
    add_qps_vs_flat(rows)
    print(json.dumps({"n": args.n, "queries": args.queries, "real_queries": True, "dim": int(real.shape[1]),
                      "real_vectors": len(real), "corpus_real": len(corpus_real), "mix": args.mix,
                      "noise": args.noise, "threads": args.threads, "train_size": args.train_size,
                      "results": rows}))

if __name__ == "__main__":
    main()
