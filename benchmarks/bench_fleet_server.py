"""A prompt fleet through the server: ``--store`` prompts on disk, traffic over ``--distinct`` of them vs one prompt.

Builds (or reuses, with ``--store-dir``) a store of ``--store`` random prompt checkpoints over the bundled
all-MiniLM-L6-v2 (P uniform in [10, 20], canaries written as by any save; about 20 ms and 0.3 MB each), starts
``promcse serve --prompts DIR`` (``--backend``, ``--quantize``, ``--prompt-cache-mb``) pinned to ``--cpus`` with as
many threads, and measures, in three phases:

1. **warm**: one request to each of the ``--distinct`` prompts (4 clients): each is a first use, so it loads the
   prompt and checks its canaries; cold-request latency and the server's RSS after 1 and after all of them are
   loaded (RSS per hot prompt = the difference / (distinct - 1)).
2. **rounds**: ``--clients`` closed-loop clients sending ``--texts-per-request`` STS sentences a request to
   ``/v1/embeddings``, ``--seconds`` a cell; cell "one" names one prompt (P = 15) in every request, cell "many"
   a prompt drawn at random among the ``--distinct`` in each request, so every engine batch mixes as many prompts
   as it holds requests. Interleaved for ``--rounds`` rounds (median kept); texts/s and p50/p99 latency.
3. **sweep**: ``--sweep`` further prompts, never used before, one request each (4 clients), each evicting the
   least recently used once the cache is full; RSS and the server's own cache metrics every ``--sweep // 8``
   loads, to see resident memory stay bounded while many times the budget passes through the cache.

The last line printed is the JSON headline (ratios many / one; goal texts/s >= 0.95, p99 <= 1.2).

Usage: python benchmarks/bench_fleet_server.py [--store 10000] [--distinct 1000] [--store-dir DIR]
       [--backend onnx --quantize int8] [--clients 32] [--texts-per-request 8] [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fleet import sts_texts  # noqa: E402
from bench_hot_soak import write_prompt  # noqa: E402
from bench_serve import free_port, stop_server, wait_healthy  # noqa: E402
from peer_load import cell_stats, metric_values, run_cell  # noqa: E402


def prompt_length(seed: int) -> int:
    """P of store prompt ``p{seed}`` (what :func:`bench_hot_soak.write_prompt` draws)."""
    return random.Random(seed).randint(10, 20)


def build_store(root: Path, count: int) -> float:
    """Write the prompts ``p0..p{count-1}`` that ``root`` lacks (a folder with ``config.json`` is kept); seconds."""
    from tqdm import tqdm

    import promcse

    missing = [k for k in range(count) if not (root / f"p{k}" / "config.json").is_file()]
    if not missing:
        return 0.0
    encoder, start = promcse.load("minilm", device="cpu"), time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for k in tqdm(missing, desc="writing prompts", unit="prompt"):
        write_prompt(root, f"p{k}", k, encoder)
    return time.perf_counter() - start


def start_server(args: argparse.Namespace, store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "promcse", "serve", "--prompts", str(store), "--port", str(port), "--device",
            "cpu", "--backend", args.backend, "--quantize", args.quantize, "--prompt-cache-mb", str(args.cache_mb)]
    if args.backend == "onnx":
        argv += ["--onnx-threads", str(len(args.cpus))]
    threads = str(len(args.cpus))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads}
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                               preexec_fn=lambda: os.sched_setaffinity(0, args.cpus))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, time.time() + 600, log)
    return process, url


def touch_each(url: str, names: list[str], clients: int = 4) -> tuple[list[float], list[str]]:
    """One 1-text request to each name (``clients`` threads); (latencies in ms, errors)."""
    latencies: list[float] = []
    errors: list[str] = []
    queue = list(reversed(names))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    name = queue.pop()
                began = time.perf_counter()
                r = http.post("/v1/embeddings", json={"input": ["A first request."], "model": name})
                with lock:
                    (latencies.append(1000 * (time.perf_counter() - began)) if r.status_code == 200
                     else errors.append(f"{name}: {r.status_code} {r.text[:120]}"))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors


def scrape(url: str) -> dict[str, float]:
    """The prompt cache's metrics."""
    return metric_values(url, ("promcse_prompt_",))


def rss_mib(server: psutil.Process) -> float:
    return server.memory_info().rss / 2**20


def warm(url: str, server: psutil.Process, one: str, distinct: list[str]) -> dict[str, Any]:
    """Phase 1: load the one prompt, then every distinct prompt; cold latencies and RSS per hot prompt."""
    touch_each(url, [one], clients=1)
    rss_one = rss_mib(server)
    latencies, errors = touch_each(url, distinct)
    rss_all = rss_mib(server)
    cache = scrape(url)
    return {"cold_request_ms_p50_p99": [round(statistics.median(latencies), 1),
                                        round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 1)],
            "errors": len(errors), "first_errors": errors[:3], "rss_mib_one_loaded": round(rss_one, 1),
            "rss_mib_all_loaded": round(rss_all, 1), "prompts_loaded": int(cache["promcse_prompt_cache_prompts"]),
            "rss_mib_per_hot_prompt": round((rss_all - rss_one) / max(1, len(distinct) - 1), 3),
            "cache_mib_per_prompt": round(cache["promcse_prompt_cache_bytes"] / 2**20
                                          / max(1, cache["promcse_prompt_cache_prompts"]), 3)}


def rounds(args: argparse.Namespace, url: str, server: psutil.Process, one: str,
           distinct: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Phase 2: the one-prompt and many-prompt cells, interleaved (order alternating by round)."""
    texts = sts_texts(4000)
    rng = random.Random(0)
    bodies = {"one": lambda batch: {"input": batch, "model": one},
              "many": lambda batch: {"input": batch, "model": rng.choice(distinct)}}
    cells: dict[str, list[dict[str, Any]]] = {"one": [], "many": []}
    for number in range(args.rounds):
        order = ("one", "many") if number % 2 == 0 else ("many", "one")
        for cell in order:
            result = run_cell(url, "/v1/embeddings", bodies[cell], texts, args.texts_per_request, args.clients,
                              args.seconds, server)
            cells[cell].append(cell_stats(result, args.texts_per_request))
            print(f"round {number + 1} {cell}: {cells[cell][-1]}", flush=True)
    return cells


def sweep(url: str, server: psutil.Process, names: list[str]) -> dict[str, Any]:
    """Phase 3: first uses of ``names`` in eight slices; RSS and the cache's metrics after each."""
    trace: list[dict[str, float]] = []
    errors = 0
    step = max(1, len(names) // 8)
    for start in range(0, len(names), step):
        errors += len(touch_each(url, names[start : start + step])[1])
        cache = scrape(url)
        trace.append({"loaded_so_far": start + len(names[start : start + step]), "rss_mib": round(rss_mib(server), 1),
                      "cache_mib": round(cache["promcse_prompt_cache_bytes"] / 2**20, 1),
                      "cached_prompts": int(cache["promcse_prompt_cache_prompts"]),
                      "evictions": int(cache["promcse_prompt_evictions_total"])})
        print(f"sweep: {trace[-1]}", flush=True)
    return {"errors": errors, "trace": trace}


def medians(cells: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    return {cell: {key: statistics.median(r[key] for r in runs) for key in ("texts_s", "p50_ms", "p99_ms")}
            for cell, runs in cells.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=int, default=10000)
    parser.add_argument("--distinct", type=int, default=1000)
    parser.add_argument("--sweep", type=int, default=2000, help="never-used prompts loaded in phase 3")
    parser.add_argument("--store-dir", type=Path, default=None, help="reuse (and complete) this store folder")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="onnx")
    parser.add_argument("--quantize", choices=("none", "int8"), default="int8")
    parser.add_argument("--cache-mb", type=float, default=400.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")], default=[0, 1])
    args = parser.parse_args()
    if args.distinct + args.sweep + 1 > args.store:
        parser.error("--distinct + --sweep + 1 must fit in --store")
    return args


def measure(args: argparse.Namespace, store: Path, log: Path) -> dict[str, Any]:
    one = next(f"p{k}" for k in range(args.store) if prompt_length(k) == 15)
    names = [f"p{k}" for k in range(args.store) if f"p{k}" != one]
    distinct, fresh = names[: args.distinct], names[args.distinct : args.distinct + args.sweep]
    process, url = start_server(args, store, log)
    server = psutil.Process(process.pid)
    try:
        warmed = warm(url, server, one, distinct)
        print(f"warm: {warmed}", flush=True)
        cells = rounds(args, url, server, one, distinct)
        swept = sweep(url, server, fresh)
    finally:
        exit_code = stop_server(process)
    return {"warm": warmed, "cells": cells, "sweep": swept, "server_exit": exit_code}


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store_dir or Path(tmp) / "store"
        built_s = build_store(store, args.store)
        result = measure(args, store, Path(tmp) / "server.log")
    table = medians(result["cells"])
    errors = result["warm"]["errors"] + result["sweep"]["errors"] + sum(
        r["errors"] for runs in result["cells"].values() for r in runs)
    headline = {"store": args.store, "distinct": args.distinct, "backend": args.backend, "quantize": args.quantize,
                "clients": args.clients, "texts_per_request": args.texts_per_request, "cache_mb": args.cache_mb,
                "store_written_s": round(built_s, 1), "medians": table,
                "many_over_one_texts_s": round(table["many"]["texts_s"] / table["one"]["texts_s"], 3),
                "many_over_one_p99": round(table["many"]["p99_ms"] / table["one"]["p99_ms"], 3),
                "warm": result["warm"], "sweep": result["sweep"]["trace"], "errors": errors,
                "server_exit": result["server_exit"]}
    print(json.dumps(headline))
    return 1 if errors or result["server_exit"] != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
