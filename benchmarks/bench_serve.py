"""The HTTP server under load: throughput, latency, errors and the server's memory across rounds.

Builds a small index (``--index-size`` sentences of the bundled wiki sample, bundled ``minilm``) in a temporary
directory, starts ``promcse serve --model minilm=minilm --index docs=DIR`` in a subprocess on 127.0.0.1 (a free
port; loopback only), waits for ``/health``, warms up (``--warmup`` good requests, not measured), then sends
``--requests`` requests split over ``--rounds`` rounds from ``--clients`` concurrent clients (threads, one
keep-alive ``httpx.Client`` each):

- ``POST /embed`` with 1-8 short texts (~60 % of requests),
- ``POST /search`` with one query, ``top_k`` 1-10 (the rest),
- and a ``--bad-fraction`` of bad requests (too many texts, too long a text, malformed JSON, wrong types, a lone
  surrogate, unknown model or index, ``top_k`` over the limit), each with the 4xx it must get.

An error is a good request that did not get 200, a bad request that did not get its 4xx (a 500 included), or
an exception (connection error, timeout). ``p50_ms``/``p99_ms`` are over the good requests (per endpoint in
``endpoints``); ``throughput_rps`` counts every request answered. The server's RSS (psutil, the server's pid)
is read after each round; ``rss_growth_mib`` is the last round's minus the first's.
At the end the server gets SIGTERM and must exit 0.

Mixed dimensions (``--mixed-dims``): the server also serves ``tiny``, a randomly initialised 2-layer BERT of width
96 built in the temporary directory with MiniLM's tokenizer (384 vs 96 dimensions), and good embedding requests
go to either model, a third of them through ``POST /v1/embeddings`` (half of those with ``dimensions``), so that
engine batches mix rows of both widths.

Memory probes (issue 15): ``--batching off`` serves one request per forward pass; ``--idle-trim off`` turns off
the engine's ``malloc_trim`` when its queue drains; ``--server-env MALLOC_ARENA_MAX=2`` (repeatable) sets the
server's environment. ``--tracemalloc`` runs the server under a small wrapper that, on SIGUSR1 (sent after the
warm-up and after each round), starts ``tracemalloc`` (the first time) and dumps a snapshot plus glibc's
``mallinfo2`` (heap bytes in use / free): the report adds ``traced_mib`` per round (Python allocations made
since the warm-up that are still alive: growth there is a leak in Python code), ``heap_free_mib`` (bytes glibc
holds but nothing uses: growth there with a flat traced heap is fragmentation) and the top allocation sites by
growth from the warm-up to the last round.

Hard cap: everything, setup included, stops after ``--max-seconds``; requests not sent by then are reported as
``unsent``. The exit status is 1 on any error, unsent request, RSS growth over ``--rss-tolerance-mib`` or a
server exit code other than 0. The last line printed is JSON:
``{"requests", "errors", "throughput_rps", "p50_ms", "p99_ms", "rss_growth_mib", ...}``.

The load (texts, request plan, one round of clients) is in ``serve_load.py`` and the memory probes in
``serve_trace.py`` beside this script; this file starts and stops the server and reports.

Usage:
    python benchmarks/bench_serve.py [--requests 2000] [--clients 8] [--rounds 3] [--max-seconds 60] [--server-threads 1]
        [--batching on|off] [--idle-trim on|off] [--server-env KEY=VALUE] [--tracemalloc] [--mixed-dims]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from serve_load import build_index, make_plan, percentiles_ms, run_round, sentences, summary_line, write_tiny_model
from serve_trace import TRACED, add_trace, probe_numbers, probe_server

HOST = "127.0.0.1"  # loopback only: the benchmark never binds or connects anywhere else



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str, deadline: float, log: Path) -> None:
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise SystemExit(f"the server did not come up (exit code {process.poll()}):\n{tail}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen, timeout: float = 30) -> int | None:
    """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None
    return process.returncode


@dataclass
class Served:
    """A running server under test: its process, URL, log, the hard-cap deadline and (``--tracemalloc``) probes."""

    process: subprocess.Popen
    url: str
    log: Path
    deadline: float
    trace_dir: Path
    probes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Totals:
    """What the measured rounds add up to: good/bad request records, failures, RSS per round, time, unsent."""

    rss0: float | None = None  # RSS after the warm-up (MiB)
    records: list[tuple[str, float, bool]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    unsent: int = 0


def parse_args() -> tuple[argparse.Namespace, dict[str, str]]:
    """The command line, checked; (args, the server's extra environment from ``--server-env``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests in all rounds (default: 2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, RSS read after each (default: 3)")
    parser.add_argument("--max-seconds", type=float, default=60, help="hard cap on the whole run (default: 60)")
    parser.add_argument("--index-size", type=int, default=300, help="sentences in the index (default: 300)")
    parser.add_argument("--bad-fraction", type=float, default=0.05,
                        help="share of bad requests, each expecting its 4xx (default: 0.05)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="good requests before round 1, not measured: the allocator's heap settles (default: 200)")
    parser.add_argument("--server-threads", type=int,
                        help="torch threads in the server (OMP_NUM_THREADS; default: torch's own choice); 1 on a "
                             "machine whose cores are busy with other work")
    parser.add_argument("--rss-tolerance-mib", type=float, default=20.0,
                        help="RSS growth from the first to the last round that still counts as none (default: 20)")
    parser.add_argument("--batching", choices=("on", "off"), default="on",
                        help="the server's --batching: off = one request per forward pass (default: on)")
    parser.add_argument("--idle-trim", choices=("on", "off"), default="on",
                        help="the server's --idle-trim: malloc_trim when the engine's queue drains (default: on)")
    parser.add_argument("--malloc-arenas", type=int, default=None,
                        help="the server's --malloc-arenas (default: the server's own default, 2; 0: glibc's)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the server, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="tracemalloc snapshots + mallinfo2 of the server after the warm-up and each round "
                             "(slows the server)")
    parser.add_argument("--mixed-dims", action="store_true",
                        help="also serve a 96-dim model and mix requests over both (batches of two widths)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.server_env if "=" in item)
    if len(extra_env) != len(args.server_env):
        parser.error("--server-env takes KEY=VALUE")
    if args.requests < 1 or args.clients < 1 or args.rounds < 1 or not 0 <= args.bad_fraction < 1:
        parser.error("--requests, --clients and --rounds must be positive; --bad-fraction in [0, 1)")
    return args, extra_env


def server_command(args: argparse.Namespace, root: Path, port: int,
                   extra_env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of ``promcse serve`` on the index under ``root``; under the tracing wrapper with
    ``--tracemalloc`` (its probe folder, ``root/trace``, made here)."""
    argv = [sys.executable, "-m", "promcse", "serve", "--model", "minilm=minilm", "--index",
            f"docs={root / 'index'}", "--host", HOST, "--port", str(port), "--device", "cpu",
            "--batching", args.batching, "--idle-trim", args.idle_trim,
            *(["--malloc-arenas", str(args.malloc_arenas)] if args.malloc_arenas is not None else []),
            *(["--model", f"tiny={write_tiny_model(root / 'tiny')}"] if args.mixed_dims else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    if args.tracemalloc:
        (root / "trace").mkdir()
        argv[1:3] = ["-c", TRACED]  # then "serve", ...: the promcse command line
        env["BENCH_TRACE_DIR"] = str(root / "trace")
    if args.server_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.server_threads)
    return argv, env


def models_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The served models good requests go to."""
    return ("minilm", "tiny") if args.mixed_dims else ("minilm",)


def warm_up(args: argparse.Namespace, served: Served, server: psutil.Process, texts: list[str],
            rng: random.Random) -> float:
    """The unmeasured warm-up requests, then the server's RSS (MiB) and, with ``--tracemalloc``, probe 0."""
    warm = run_round(served.url, make_plan(args.warmup, 0.0, texts, rng, models_of(args)), args.clients,
                     served.deadline)
    rss0 = server.memory_info().rss / 2**20
    print(f"warm-up: {len(warm['records'])} requests, RSS {rss0:.1f} MiB")
    if args.tracemalloc:
        served.probes.append(probe_server(served.process, served.trace_dir, 0))
    return rss0


def measured_round(args: argparse.Namespace, served: Served, server: psutil.Process, number: int, share: int,
                   texts: list[str], rng: random.Random, totals: Totals) -> None:
    """Round ``number`` of ``share`` requests, added to ``totals``; the server's RSS (and probe) after it, printed."""
    plan = make_plan(share, args.bad_fraction, texts, rng, models_of(args))
    result = run_round(served.url, plan, args.clients, served.deadline)
    totals.records += result["records"]
    totals.failures += result["failures"]
    totals.seconds += result["seconds"]
    totals.unsent += result["unsent"]
    totals.rss.append(server.memory_info().rss / 2**20)
    done = len(result["records"])
    traced = ""
    if args.tracemalloc:
        served.probes.append(probe_server(served.process, served.trace_dir, number))
        held, free = probe_numbers(served.probes[-1])
        traced = f", traced since warm-up {held:.2f} MiB, glibc heap free {free or 0:.1f} MiB"
    print(f"round {number}: {done} requests in {result['seconds']:.1f} s "
          f"({done / max(result['seconds'], 1e-9):.1f} req/s), errors {len(result['failures'])}, "
          f"server RSS {totals.rss[-1]:.1f} MiB{traced}; {summary_line(result['records'])}")


def drive(args: argparse.Namespace, served: Served, began: float, texts: list[str], rng: random.Random,
          totals: Totals) -> None:
    """Wait for the server, warm it up, then run the measured rounds into ``totals``."""
    wait_healthy(served.process, served.url, served.deadline, served.log)
    server = psutil.Process(served.process.pid)
    setup_s = time.monotonic() - began
    print(f"server pid {served.process.pid} on {served.url} up after {setup_s:.1f} s (index: {args.index_size} "
          f"texts); {args.requests} requests, {args.clients} clients, {args.rounds} rounds, "
          f"cap {args.max_seconds:.0f} s")
    totals.rss0 = warm_up(args, served, server, texts, rng)
    shares = [args.requests // args.rounds + (i < args.requests % args.rounds) for i in range(args.rounds)]
    for number, share in enumerate(shares, start=1):
        measured_round(args, served, server, number, share, texts, rng, totals)


def serve_and_load(args: argparse.Namespace, extra_env: dict[str, str], began: float, texts: list[str],
                   rng: random.Random) -> tuple[Totals, list[dict[str, Any]], int | None]:
    """Build the index, start the server, put it under load, stop it; (totals, probes, server exit code)."""
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        root = Path(tmp)
        build_index(root / "index", args.index_size)
        port, log = free_port(), root / "server.log"
        argv, env = server_command(args, root, port, extra_env)
        with open(log, "w", encoding="utf-8") as sink:  # a file, not a pipe: access logs never block the server
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        served = Served(process, f"http://{HOST}:{port}", log, began + args.max_seconds, root / "trace")
        totals = Totals()
        try:
            drive(args, served, began, texts, rng, totals)
        finally:
            exit_code = stop_server(process)
    return totals, served.probes, exit_code


def endpoint_stats(records: list[tuple[str, float, bool]]) -> dict[str, dict[str, Any]]:
    """Count, p50 and p99 (ms) per endpoint (``bad``: the bad requests)."""
    endpoints = {}
    for name in ("embed", "v1/embeddings", "search", "bad"):
        lat = [r[1] for r in records if r[0] == name]
        e50, e99 = percentiles_ms(lat)
        endpoints[name] = {"n": len(lat), "p50_ms": e50, "p99_ms": e99}
    return endpoints


def headline_of(args: argparse.Namespace, totals: Totals, exit_code: int | None, extra_env: dict[str, str],
                began: float) -> dict[str, Any]:
    """The JSON headline (without the ``--tracemalloc`` numbers)."""
    records, rss, seconds, rss0 = totals.records, totals.rss, totals.seconds, totals.rss0
    p50, p99 = percentiles_ms([r[1] for r in records if r[0] != "bad"])
    return {
        "requests": len(records), "errors": len(totals.failures),
        "throughput_rps": round(len(records) / seconds, 2) if seconds else 0.0,
        "p50_ms": p50, "p99_ms": p99,
        "rss_growth_mib": round(rss[-1] - rss[0], 2) if rss else None,
        "rss_mib": [round(r, 1) for r in rss], "endpoints": endpoint_stats(records), "clients": args.clients,
        "rounds": args.rounds, "warmup": args.warmup, "server_threads": args.server_threads,
        "unsent": totals.unsent, "server_exit": exit_code, "batching": args.batching, "idle_trim": args.idle_trim,
        "malloc_arenas": args.malloc_arenas if args.malloc_arenas is not None else "server default (2)",
        "server_env": extra_env, "rss_warmup_mib": round(rss0, 1) if rss0 is not None else None,
        "wall_s": round(time.monotonic() - began, 1), "mixed_dims": args.mixed_dims,
    }


def main() -> int:
    """Run the load test and print the report, then the JSON headline; 0 if all went well, else 1."""
    args, extra_env = parse_args()
    began = time.monotonic()
    rng = random.Random(args.seed)
    texts = sentences(1000, skip=args.index_size)
    totals, probes, exit_code = serve_and_load(args, extra_env, began, texts, rng)
    for line in totals.failures[:10]:
        print(f"error: {line}")
    print(f"server exit code after SIGTERM: {exit_code}")
    headline = headline_of(args, totals, exit_code, extra_env, began)
    add_trace(headline, probes)
    print(json.dumps(headline))
    rss = totals.rss
    grew = bool(rss) and rss[-1] - rss[0] > args.rss_tolerance_mib
    return 0 if not totals.failures and not totals.unsent and exit_code == 0 and not grew else 1

if __name__ == "__main__":
    sys.exit(main())
