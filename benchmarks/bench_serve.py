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

Usage:
    python benchmarks/bench_serve.py [--requests 2000] [--clients 8] [--rounds 3] [--max-seconds 60] [--server-threads 1]
        [--batching on|off] [--idle-trim on|off] [--server-env KEY=VALUE] [--tracemalloc] [--mixed-dims]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

HOST = "127.0.0.1"  # loopback only: the benchmark never binds or connects anywhere else
BAD: list[tuple[str, Any, int]] = [  # (path, JSON payload or raw bytes, expected status) with default limits
    ("/embed", {"texts": ["x"] * 257}, 413),
    ("/embed", {"texts": ["y" * 2001]}, 413),
    ("/embed", b'{"texts": ["unterminated"', 422),
    ("/embed", {"texts": "not a list"}, 422),
    ("/embed", b'{"texts": ["\\ud800 lone surrogate"]}', 422),
    ("/embed", {"texts": ["fine"], "model": "../../etc/passwd"}, 404),
    ("/search", {"query": "q", "top_k": 101}, 422),
    ("/search", {"query": "q", "index": "missing"}, 404),
    ("/search", {"query": "q", "threshold": "high"}, 422),
]


# Run as ``python -c TRACED serve ...`` (the promcse command line): on SIGUSR1, start tracemalloc (the first time)
# and dump a snapshot and glibc's mallinfo2 into $BENCH_TRACE_DIR/probe-N.pickle (a temporary name, then renamed).
TRACED = r"""
import ctypes, os, pickle, runpy, signal, sys, tracemalloc
where, count = os.environ["BENCH_TRACE_DIR"], [0]
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
def mallinfo():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    fn.restype = MallInfo2
    info = fn()
    return {name: getattr(info, name) for name, _ in MallInfo2._fields_}
def probe(sig, frame):
    if not tracemalloc.is_tracing():
        tracemalloc.start(6)
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    path = os.path.join(where, f"probe-{count[0]}")
    with open(path + ".tmp", "wb") as out:
        pickle.dump({"snapshot": snap, "mallinfo": mallinfo()}, out)
    os.replace(path + ".tmp", path + ".pickle")
    count[0] += 1
signal.signal(signal.SIGUSR1, probe)
sys.argv = ["promcse"] + sys.argv[1:]
runpy.run_module("promcse", run_name="__main__", alter_sys=True)
"""


def probe_server(process: subprocess.Popen, trace_dir: Path, number: int, timeout: float = 60) -> dict[str, Any]:
    """SIGUSR1 the traced server; wait for its ``number``-th probe file and load it."""
    process.send_signal(signal.SIGUSR1)
    path, until = trace_dir / f"probe-{number}.pickle", time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > until:
            raise SystemExit(f"the traced server wrote no {path.name}")
        time.sleep(0.1)
    with open(path, "rb") as src:
        return pickle.load(src)


def probe_numbers(probe: dict[str, Any]) -> tuple[float, float | None]:
    """(traced MiB, glibc heap free MiB) of one probe."""
    traced = sum(stat.size for stat in probe["snapshot"].statistics("filename")) / 2**20
    info = probe["mallinfo"]
    return traced, (info["fordblks"] / 2**20 if info else None)


def top_growth(first: dict[str, Any], last: dict[str, Any], count: int = 8) -> list[str]:
    """Allocation sites (line, with the calling lines) that grew most from ``first`` to ``last``."""
    diff = last["snapshot"].compare_to(first["snapshot"], "traceback")
    lines = []
    for stat in diff[:count]:
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[:4])
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+d} blocks) at {frames}")
    return lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def sentences(count: int, skip: int = 0) -> list[str]:
    """Distinct non-empty lines of the bundled wiki sample."""
    path = resources.files("promcse").joinpath("resources", "data", "train", "wiki_5k.txt")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    unique = list(dict.fromkeys(line for line in lines if line))
    return unique[skip:skip + count]


def build_index(directory: Path, size: int) -> None:
    from promcse.corpus.search import Index

    index = Index("minilm", kind="flat", device="cpu")
    index.add(sentences(size))
    index.save(directory)


def embed_request(texts: list[str], rng: random.Random, models: tuple[str, ...]) -> tuple[str, Any, int]:
    """A good embedding request: ``/embed``, or (several models) a third through ``/v1/embeddings``."""
    batch = [t[:120] for t in rng.sample(texts, rng.randint(1, 8))]
    if len(models) == 1:
        return ("/embed", {"texts": batch}, 200)
    model = rng.choice(models)
    if rng.random() < 1 / 3:
        body: dict[str, Any] = {"input": batch, "model": model}
        if rng.random() < 0.5:
            body["dimensions"] = rng.choice([8, 32, 64])
        return ("/v1/embeddings", body, 200)
    return ("/embed", {"texts": batch, "model": model}, 200)


def make_plan(count: int, bad_fraction: float, texts: list[str], rng: random.Random,
              models: tuple[str, ...] = ("minilm",)) -> list[tuple[str, Any, int]]:
    """``count`` requests: (path, payload, expected status)."""
    plan: list[tuple[str, Any, int]] = []
    for _ in range(count):
        draw = rng.random()
        if draw < bad_fraction:
            plan.append(rng.choice(BAD))
        elif draw < bad_fraction + 0.6 * (1 - bad_fraction):
            plan.append(embed_request(texts, rng, models))
        else:
            plan.append(("/search", {"query": rng.choice(texts)[:120], "top_k": rng.randint(1, 10)}, 200))
    return plan


def write_tiny_model(directory: Path) -> Path:
    """A random 2-layer BERT of width 96 with MiniLM's tokenizer (``--mixed-dims``): another output dimension."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from promcse.encoder.backbone import minilm_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=192, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def endpoint_of(path: str, expected: int) -> str:
    return path.strip("/") if expected == 200 else "bad"


def run_round(url: str, plan: list[tuple[str, Any, int]], clients: int, deadline: float) -> dict[str, Any]:
    """Send ``plan`` from ``clients`` threads; stop at ``deadline``."""
    work: queue.SimpleQueue[tuple[str, Any, int]] = queue.SimpleQueue()
    for item in plan:
        work.put(item)
    records: list[tuple[str, float, bool]] = []  # (endpoint, latency s, ok)
    failures: list[str] = []
    cut_off = [0]  # timed out only because the hard cap shortened the timeout: unsent, not an error
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as session:
            while time.monotonic() < deadline:
                try:
                    path, payload, expected = work.get_nowait()
                except queue.Empty:
                    return
                timeout = max(0.5, min(30.0, deadline - time.monotonic()))
                capped = timeout < 30.0
                start = time.perf_counter()
                try:
                    if isinstance(payload, bytes):
                        response = session.post(path, content=payload, timeout=timeout,
                                                headers={"content-type": "application/json"})
                    else:
                        response = session.post(path, json=payload, timeout=timeout)
                    ok = response.status_code == expected
                    detail = f"{path} -> {response.status_code} (expected {expected}): {response.text[:160]}"
                except httpx.TimeoutException as err:
                    if capped and time.monotonic() >= deadline:
                        with lock:
                            cut_off[0] += 1
                        continue
                    ok, detail = False, f"{path} -> {type(err).__name__}: {err}"
                except httpx.HTTPError as err:
                    ok, detail = False, f"{path} -> {type(err).__name__}: {err}"
                elapsed = time.perf_counter() - start
                with lock:
                    records.append((endpoint_of(path, expected), elapsed, ok))
                    if not ok:
                        failures.append(detail)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 35))
    return {"records": records, "failures": failures, "seconds": time.perf_counter() - started,
            "unsent": len(plan) - len(records)}


def percentiles_ms(latencies: list[float]) -> tuple[float | None, float | None]:
    if not latencies:
        return None, None
    p50, p99 = np.percentile(np.array(latencies) * 1000.0, [50, 99])
    return round(float(p50), 2), round(float(p99), 2)


def summary_line(records: list[tuple[str, float, bool]]) -> str:
    parts = []
    for name in ("embed", "search", "bad"):
        lat = [r[1] for r in records if r[0] == name]
        p50, p99 = percentiles_ms(lat)
        parts.append(f"{name} n={len(lat)} p50={p50} ms p99={p99} ms")
    return "; ".join(parts)


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


def add_trace(headline: dict[str, Any], probes: list[dict[str, Any]]) -> None:
    """With two probes or more: traced and glibc-free MiB per probe into ``headline``; print the top growth."""
    if len(probes) > 1:
        numbers = [probe_numbers(p) for p in probes]
        headline["traced_mib"] = [round(t, 2) for t, _ in numbers]  # [0] right after tracing started
        headline["heap_free_mib"] = [round(f, 1) if f is not None else None for _, f in numbers]
        for line in top_growth(probes[0], probes[-1]):
            print(f"growth since warm-up: {line}")


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
