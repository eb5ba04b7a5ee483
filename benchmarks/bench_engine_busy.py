"""How busy the batching engine is under closed-loop load: one promcse server, one cell, the engine's own metrics.

Starts ``promcse serve --model minilm=minilm [SERVER FLAGS...]`` pinned to ``--cpus`` (as many threads), warms it
for 3 s, then runs ``--clients`` closed-loop clients sending ``--texts-per-request`` distinct STS sentences to
``/v1/embeddings`` for ``--seconds``, reading ``promcse_batch_seconds`` / ``promcse_batch_rows`` from ``/metrics``
before and after. Busy fraction = seconds inside the engine's forward passes / wall seconds: how much of the time
the model ran, and how long a batch took, which the serving stack around it leaves.

The last line printed is JSON: texts/s, p50/p99 ms, server CPU ms a text, busy fraction, batches, rows a batch, ms a
batch.

Usage: python benchmarks/bench_engine_busy.py [--texts-per-request 8] [--clients 8] [--seconds 12] -- --backend onnx
       --quantize int8 --onnx-threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, stop_server, wait_healthy  # noqa: E402
from bench_serve_peers import sts_texts  # noqa: E402
from peer_load import cell_stats, metric_values, run_cell  # noqa: E402

SERIES = ("promcse_batch_seconds_sum", "promcse_batch_seconds_count", "promcse_batch_rows_sum")


def start(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port, threads = free_port(), str(len(args.cpus))
    argv = [sys.executable, "-m", "promcse", "serve", "--model", "minilm=minilm", "--port", str(port), "--device",
            "cpu", *args.server_flags]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                               preexec_fn=lambda: os.sched_setaffinity(0, args.cpus))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, time.time() + 300, log)
    return process, url


def measure(args: argparse.Namespace, url: str, server: psutil.Process) -> dict[str, Any]:
    texts, t = sts_texts(), args.texts_per_request
    body = lambda batch: {"input": batch, "model": "minilm"}  # noqa: E731
    run_cell(url, "/v1/embeddings", body, texts, t, args.clients, 3.0, server)  # warm-up
    before, began = metric_values(url, SERIES), time.perf_counter()
    result = run_cell(url, "/v1/embeddings", body, texts, t, args.clients, args.seconds, server)
    wall, after = time.perf_counter() - began, metric_values(url, SERIES)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    batches = max(1.0, delta["promcse_batch_seconds_count"])
    return {**cell_stats(result, t), "busy_fraction": round(delta["promcse_batch_seconds_sum"] / wall, 3),
            "batches": int(delta["promcse_batch_seconds_count"]),
            "rows_per_batch": round(delta["promcse_batch_rows_sum"] / batches, 1),
            "ms_per_batch": round(1000 * delta["promcse_batch_seconds_sum"] / batches, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")], default=[0, 1])
    parser.add_argument("server_flags", nargs="*", help="after --: flags for promcse serve")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start(args, Path(tmp) / "server.log")
        headline: dict[str, Any] = {"errors": -1}
        try:
            headline = measure(args, url, psutil.Process(process.pid))
        finally:
            headline["server_exit"] = stop_server(process)
    print(json.dumps({"server_flags": args.server_flags, **headline}))
    return 0 if headline["errors"] == 0 and headline["server_exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
