"""Streaming corpus encode vs today's one-file encode: texts/s, peak RSS at two corpus sizes, kill -9 and resume.

The corpus is synthetic: N lines made by repeating, in one seeded shuffled order, every distinct sentence of
the package's bundled training files (``wiki_5k.txt``, ``snli_triplets.csv``) and of ``--data-root``'s training
files (the wiki1m head, the SNLI dev/test pairs) — about 35k distinct sentences, long wiki and short SNLI ones
mixed evenly, so every size sees the same mix. Each (path, size) runs in a fresh subprocess with the model
loaded first; the peak-RSS counter (VmHWM) is then reset (``/proc/self/clear_refs``; the lifetime peak where
that is refused) so the number is the encode's own peak over the loaded model. Paths:

- ``today``: ``data.read_sentences`` + ``encoder.encode`` over the whole list, then one ``np.save``
  (what ``promcse encode --output FILE.npy`` does): memory grows with N (``--today-sizes``: where it runs);
- ``streaming``: ``corpus.encode_corpus`` into shards of ``--shard-size`` rows (what
  ``promcse encode --output DIR`` does): memory is bounded by the shard size;
- ``ray`` (with ``--ray-workers N``, at ``--ray-sizes``): ``ray_encode.encode_files`` on N Ray actors of
  ``--ray-threads`` torch threads each (what ``promcse encode --engine ray --workers N`` does), on a local Ray
  instance of N x threads CPUs started by the child before the clock starts (actor start-up is inside the
  time). Its shard files are compared byte for byte with ``streaming``'s (``ray_identical``); its peak RSS is
  the driver's only (the actors are other processes), and its "CPU seconds" are the actors' reserved CPUs x
  wall time.
- **kill -9** (``--kill-size N``): the streaming child is started again at size N and sent SIGKILL at a random
  moment (seeded, uniform over 10-90 % of the uninterrupted run's time after its model load), then the same
  child is run again to the end. Every file of the result (shards and manifest) is compared byte for byte with
  the uninterrupted run (``kill_identical``), with the shards listed when it was killed and the resumed run's
  seconds.

The vectors of ``today`` and ``streaming`` are compared at the smaller size (``max_abs_diff``). Throughput is
given per wall second and per CPU second of the process (the fairer number on a shared machine).
The last line printed is the JSON headline.

Usage:
    python benchmarks/bench_encode_corpus.py [--sizes 50000 200000] [--shard-size 10000] [--model minilm]
        [--batch-size 64] [--threads 2] [--today-sizes 50000] [--ray-workers 2 --ray-sizes 50000]
        [--kill-size 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
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


def distinct_training_sentences(data_root: Path) -> list[str]:
    """Every distinct sentence of the bundled and the shared training files, in a seeded shuffled order."""
    import csv

    from promcse.io.data import bundled_path

    texts = [line.strip() for line in bundled_path("wiki_5k.txt").read_text(encoding="utf-8").split("\n")]
    texts += (data_root / "train" / "wiki1m_partial" / "wiki1m_head_11914.txt").read_text(encoding="utf-8").split("\n")
    with open(bundled_path("snli_triplets.csv"), encoding="utf-8", newline="") as handle:
        texts += [cell for row in csv.DictReader(handle) for cell in row.values()]
    pairs = (data_root / "train" / "snli_devtest" / "snli_devtest_pairs.tsv").read_text(encoding="utf-8").split("\n")
    texts += [field for line in pairs[1:] for field in line.split("\t")[1:3]]
    distinct = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
    random.Random(0).shuffle(distinct)
    return distinct


def write_corpus(path: Path, n: int, sentences: list[str]) -> Path:
    """N lines cycling through ``sentences``."""
    with open(path, "w", encoding="utf-8") as handle:
        for sentence in islice(cycle(sentences), n):
            handle.write(sentence + "\n")
    return path


def child(args: argparse.Namespace) -> None:
    """One path at one size; prints a JSON line."""
    import numpy as np
    import torch

    import promcse
    from promcse.corpus.encode import EncodeJob, encode_corpus
    from promcse.io.data import read_sentences

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

    from promcse.corpus.encode import EncodeJob
    from promcse.corpus.ray_encode import RayEncodeConfig, encode_files

    threads = args.ray_threads
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


def child_command(args: argparse.Namespace, mode: str, corpus: Path, out: Path) -> list[str]:
    return [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--out", str(out), "--model",
            args.model, "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
            "--threads", str(args.threads), "--ray-workers", str(args.ray_workers), "--ray-threads",
            str(args.ray_threads)]


def run(args: argparse.Namespace, mode: str, corpus: Path, out: Path) -> dict:
    proc = subprocess.run(child_command(args, mode, corpus, out), capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kill_and_resume(args: argparse.Namespace, corpus: Path, out: Path, whole: Path, seconds: float) -> dict:
    """SIGKILL a streaming child at a random moment, run it again to the end, compare with ``whole``."""
    from promcse.corpus.shards import MANIFEST

    delay = random.Random(args.seed).uniform(0.1, 0.9) * seconds
    proc = subprocess.Popen(child_command(args, "streaming", corpus, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # the model load is not in ``seconds``: start the clock when the child's first output exists
    start = time.monotonic()
    while not out.exists() and proc.poll() is None and time.monotonic() - start < 600:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        listed = len(json.loads((out / MANIFEST).read_text())["shards"])
    except (OSError, ValueError):
        listed = 0
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    resumed = run(args, "streaming", corpus, out)
    return {"killed_after_s": round(delay, 1), "shards_listed_when_killed": listed,
            "files_when_killed": len(leftovers), "resumed_seconds": round(resumed["seconds"], 1),
            "kill_identical": same_files(out, whole)}


def compare(today: Path, streamed: Path) -> float:
    import numpy as np

    from promcse.corpus.shards import read_manifest, read_vectors

    shards = np.concatenate([read_vectors(streamed, e) for e in read_manifest(streamed)["shards"]])
    return float(np.abs(np.load(today) - shards).max())


def same_files(a: Path, b: Path) -> bool:
    """Whether two shard directories hold the same files with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                   for n in names)


Results = dict[str, dict[int, dict]]  # mode -> size -> one child's JSON line


def parse_args() -> argparse.Namespace:
    """The command line (the hidden ``--child``, ``--corpus`` and ``--out`` are for the child processes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[50000, 200000])  # ~90 texts/s per core on CPU
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one-process paths (0: torch's default)")
    parser.add_argument("--today-sizes", type=int, nargs="*", help="sizes at which today's path runs (default: both)")
    parser.add_argument("--ray-workers", type=int, default=0,
                        help="also run promcse encode --engine ray with this many actors (0: not run)")
    parser.add_argument("--ray-threads", type=int, default=1, help="torch threads per Ray actor")
    parser.add_argument("--ray-sizes", type=int, nargs="*", help="sizes at which the Ray path runs (default: both)")
    parser.add_argument("--kill-size", type=int, default=0, help="kill -9 and resume the streaming encode at this size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moment")
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                        help="the shared data folder (default: ../shared/data beside the checkout)")
    parser.add_argument("--child", choices=("today", "streaming", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_modes(args: argparse.Namespace, tmp: Path, n: int, corpus: Path, results: Results) -> None:
    """Run every path wanted at size ``n`` on ``corpus`` into ``results``; print each one's numbers."""
    wanted = {"today": args.today_sizes, "streaming": None, "ray": args.ray_sizes}
    for mode in results:
        if wanted[mode] is not None and n not in wanted[mode]:
            continue
        out = tmp / (f"today-{n}.npy" if mode == "today" else f"{mode}-shards-{n}")
        results[mode][n] = run(args, mode, corpus, out)
        r = results[mode][n]
        print(f"{mode:<9} N={n:>8}: {n / r['seconds']:7.1f} texts/s ({n / r['cpu_seconds']:.1f} per CPU s), "
              f"peak RSS over the loaded model {(r['peak_kib'] - r['base_kib']) / 1024:7.1f} MiB "
              f"(process {r['peak_kib'] / 1024:.0f} MiB)", flush=True)


def clean_size(tmp: Path, n: int, corpus: Path, sizes: list[int]) -> None:
    """Remove size ``n``'s corpus and (but at the smallest size) its shard folders: one size on disk at a time."""
    os.unlink(corpus)
    for extra in tmp.glob(f"*-{n}*"):
        if extra.is_dir() and n != min(sizes):
            for f in extra.iterdir():
                f.unlink()
            extra.rmdir()


def run_size(args: argparse.Namespace, tmp: Path, n: int, sentences: list[str], results: Results,
             identical: dict[str, bool]) -> dict:
    """Every path at size ``n``, the Ray/streaming comparison and, at ``--kill-size``, kill -9 and resume;
    the kill's results ({} if not run here)."""
    killed: dict = {}
    corpus = write_corpus(tmp / f"corpus-{n}.txt", n, sentences)
    run_modes(args, tmp, n, corpus, results)
    if n in results.get("ray", {}):
        identical[str(n)] = same_files(tmp / f"streaming-shards-{n}", tmp / f"ray-shards-{n}")
    if n == args.kill_size:
        killed = kill_and_resume(args, corpus, tmp / f"killed-shards-{n}", tmp / f"streaming-shards-{n}",
                                 results["streaming"][n]["seconds"])
        print(f"kill -9 at N={n}: {killed}", flush=True)
    clean_size(tmp, n, corpus, args.sizes)
    return killed


def run_all(args: argparse.Namespace, sentences: list[str]) -> tuple[Results, dict[str, bool], dict, float | None]:
    """Every size in turn in a temporary folder; (results, ray_identical, kill results, max_abs_diff)."""
    results: Results = {"today": {}, "streaming": {}, **({"ray": {}} if args.ray_workers else {})}
    identical: dict[str, bool] = {}
    killed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.sizes):
            killed = run_size(args, Path(tmp), n, sentences, results, identical) or killed
        small = min(args.sizes)
        diff = compare(Path(tmp) / f"today-{small}.npy", Path(tmp) / f"streaming-shards-{small}") \
            if small in results["today"] else None
    return results, identical, killed, diff


def headline_of(args: argparse.Namespace, sentences: list[str], results: Results, identical: dict[str, bool],
                killed: dict, diff: float | None) -> dict:
    """The JSON headline."""
    headline = {
        "corpus": f"{len(sentences)} distinct bundled + shared training sentences, shuffled, repeated to size",
        "model": args.model, "threads": args.threads,
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
        headline["ray_threads_per_worker"] = args.ray_threads
        headline["ray_identical"] = identical
        headline["ray_speedup_vs_streaming"] = {str(n): round(results["streaming"][n]["seconds"] / r["seconds"], 2)
                                                for n, r in results["ray"].items()}
    if killed:
        headline["kill"] = {"size": args.kill_size, **killed}
    headline["streaming_vs_today"] = {str(n): round(r["seconds"] / results["streaming"][n]["seconds"], 3)
                                      for n, r in results["today"].items()}
    return headline


def main() -> None:
    """A child run (``--child``), or every path at every size, then the JSON headline."""
    args = parse_args()
    if args.child:
        return child(args)
    sentences = distinct_training_sentences(args.data_root)
    print(f"corpus: {len(sentences)} distinct training sentences repeated to size", flush=True)
    results, identical, killed, diff = run_all(args, sentences)
    print(json.dumps(headline_of(args, sentences, results, identical, killed, diff)))

if __name__ == "__main__":
    main()
