"""Streaming corpus encode vs today's one-file encode: texts/s, and peak RSS at two corpus sizes.

The corpus is synthetic: N lines made by repeating the bundled ``wiki_5k.txt`` sentences (the package's
unsupervised training file) in order, so the two paths see identical texts. Each (path, size) runs in a
fresh subprocess with the model loaded first; the peak-RSS counter (VmHWM) is then reset
(``/proc/self/clear_refs``; the lifetime peak where that is refused) so the number is the encode's own
peak over the loaded model. Paths:

- ``today``: ``data.read_sentences`` + ``encoder.encode`` over the whole list, then one ``np.save``
  (what ``promcse encode --output FILE.npy`` does): memory grows with N;
- ``streaming``: ``corpus.encode_corpus`` into shards of ``--shard-size`` rows (what
  ``promcse encode --output DIR`` does): memory is bounded by the shard size;
- ``ray`` (with ``--ray-workers N``): ``ray_encode.encode_files`` on N Ray actors of ``--threads`` torch threads
  each (what ``promcse encode --engine ray --workers N`` does), on a local Ray instance of N x threads CPUs
  started by the child before the clock starts (actor start-up is inside the time). Its shard files are
  compared byte for byte with ``streaming``'s at every size (``ray_identical``); its peak RSS is the driver's
  only (the actors are other processes), and its "CPU seconds" are the actors' reserved CPUs x wall time.

The vectors of both paths are compared at the smaller size (``max_abs_diff``). Throughput is given per wall
second and per CPU second of the process (the fairer number on a shared machine). At small N both peaks are
dominated by the longest batch's activations (attention at batch 64 x 256 tokens is ~200 MB for MiniLM) and
allocator noise; the difference shows once N x (4·D bytes + tokens + text) outgrows that, e.g. 100k+ rows.
The last line printed is the JSON headline.

Usage:
    python benchmarks/bench_encode_corpus.py [--sizes 20000 100000] [--shard-size 10000] [--model minilm]
        [--batch-size 64] [--threads 1] [--ray-workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    """Reset the peak-RSS counter to the current RSS; False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_corpus(path: Path, n: int) -> Path:
    """N lines cycling through the bundled wiki_5k sentences."""
    from promcse.data import bundled_path

    sentences = [s for s in bundled_path("wiki_5k.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    with open(path, "w", encoding="utf-8") as handle:
        for sentence in islice(cycle(sentences), n):
            handle.write(sentence.strip() + "\n")
    return path


def child(args: argparse.Namespace) -> None:
    """One path at one size; prints a JSON line."""
    import numpy as np
    import torch

    import promcse
    from promcse.corpus import EncodeJob, encode_corpus
    from promcse.data import read_sentences

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "ray":
        return ray_child(args)
    encoder = promcse.load(args.model, device="cpu")
    encoder.encode(["warm up the first call"] * 8)
    base = rss_kib("VmRSS")
    exact = reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    if args.child == "today":
        vectors = encoder.encode(read_sentences(args.corpus).anchor, batch_size=args.batch_size)
        np.save(args.out, vectors)
    else:
        encode_corpus(encoder, EncodeJob(Path(args.corpus), Path(args.out), shard_size=args.shard_size,
                                         batch_size=args.batch_size), args.model)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_kib": rss_kib("VmHWM"), "base_kib": base,
                      "peak_reset": exact}))


def ray_child(args: argparse.Namespace) -> None:
    """``--child ray``: the same encode on ``--ray-workers`` actors of a local Ray instance; prints a JSON line."""
    import ray

    from promcse.corpus import EncodeJob
    from promcse.ray_encode import RayEncodeConfig, encode_files

    threads = args.threads or 1
    ray.init(num_cpus=args.ray_workers * threads, include_dashboard=False, log_to_driver=False)
    base = rss_kib("VmRSS")
    exact = reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    encode_files(EncodeJob(Path(args.corpus), Path(args.out), shard_size=args.shard_size, batch_size=args.batch_size),
                 args.model, RayEncodeConfig(workers=args.ray_workers, cpus_per_worker=threads))
    seconds = time.perf_counter() - start
    cpu = seconds * args.ray_workers * threads  # the CPUs reserved for the actors, for the whole run
    peak = rss_kib("VmHWM")
    ray.shutdown()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_kib": peak, "base_kib": base,
                      "peak_reset": exact}))


def run(args: argparse.Namespace, mode: str, corpus: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--out", str(out), "--model",
           args.model, "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
           "--threads", str(args.threads), "--ray-workers", str(args.ray_workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(today: Path, streamed: Path) -> float:
    import numpy as np

    from promcse.shards import read_manifest, read_vectors

    shards = np.concatenate([read_vectors(streamed, e) for e in read_manifest(streamed)["shards"]])
    return float(np.abs(np.load(today) - shards).max())


def same_files(a: Path, b: Path) -> bool:
    """Whether two shard directories hold the same files with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                   for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[20000, 100000])  # ~75 texts/s per core on CPU
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    parser.add_argument("--ray-workers", type=int, default=0,
                        help="also run promcse encode --engine ray with this many actors (0: not run)")
    parser.add_argument("--child", choices=("today", "streaming", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results: dict[str, dict[int, dict]] = {"today": {}, "streaming": {}, **({"ray": {}} if args.ray_workers else {})}
    identical: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.sizes):
            corpus = write_corpus(Path(tmp) / f"corpus-{n}.txt", n)
            for mode in results:
                out = Path(tmp) / (f"today-{n}.npy" if mode == "today" else f"{mode}-shards-{n}")
                results[mode][n] = run(args, mode, corpus, out)
                r = results[mode][n]
                print(f"{mode:<9} N={n:>8}: {n / r['seconds']:7.1f} texts/s ({n / r['cpu_seconds']:.1f} per CPU s), "
                      f"peak RSS over the loaded model {(r['peak_kib'] - r['base_kib']) / 1024:7.1f} MiB "
                      f"(process {r['peak_kib'] / 1024:.0f} MiB)")
            if args.ray_workers:
                identical[str(n)] = same_files(Path(tmp) / f"streaming-shards-{n}", Path(tmp) / f"ray-shards-{n}")
        small = min(args.sizes)
        diff = compare(Path(tmp) / f"today-{small}.npy", Path(tmp) / f"streaming-shards-{small}")
    headline = {
        "corpus": "bundled wiki_5k sentences repeated in order", "model": args.model, "threads": args.threads,
        "shard_size": args.shard_size, "batch_size": args.batch_size,
        "texts_per_s": {mode: {str(n): round(n / r["seconds"], 1) for n, r in by.items()}
                        for mode, by in results.items()},
        "texts_per_cpu_s": {mode: {str(n): round(n / r["cpu_seconds"], 1) for n, r in by.items()}
                            for mode, by in results.items()},
        "peak_rss_over_model_mib": {mode: {str(n): round((r["peak_kib"] - r["base_kib"]) / 1024, 1)
                                           for n, r in by.items()} for mode, by in results.items()},
        "peak_reset": all(r["peak_reset"] for by in results.values() for r in by.values()),
        "max_abs_diff": diff,
    }
    if args.ray_workers:
        headline["ray_workers"] = args.ray_workers
        headline["ray_identical"] = identical
        headline["ray_speedup_vs_streaming"] = {str(n): round(results["streaming"][n]["seconds"] / r["seconds"], 2)
                                                for n, r in results["ray"].items()}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
