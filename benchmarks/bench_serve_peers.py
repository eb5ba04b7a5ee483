"""HTTP embeddings throughput of ``promcse serve`` against Infinity (``infinity-emb``): same box, same model, same load.

Every server serves the bundled all-MiniLM-L6-v2 as ``minilm`` on 127.0.0.1 (loopback only) and gets the same
OpenAI-style request, ``{"input": [T texts], "model": "minilm", "encoding_format": "float"}``: promcse on
``POST /v1/embeddings``, Infinity on its ``POST /embeddings`` (no ``/v1`` prefix). Servers (``--servers``):

- ``promcse-onnx-int8``: ``--backend onnx --quantize int8 --onnx-threads N`` (batching on),
- ``promcse-onnx``: ``--backend onnx --onnx-threads N`` (fp32 graph, batching on),
- ``promcse-torch``: PyTorch, batching across requests (the default),
- ``promcse-torch-unbatched``: PyTorch, ``--batching off`` (one request per forward pass),
- ``infinity-torch``: Infinity's torch engine (sentence-transformers; ``--batch-size 32``, no torch.compile),
- ``infinity-optimum``: Infinity's optimum engine (ONNX Runtime) on an fp32 ONNX export,
- ``infinity-optimum-int8``: the same on optimum's dynamic int8 quantisation for this CPU;

the Infinity ones start through ``peer_infinity.py`` (beside this file) from the side environment
``/work/venv-infinity`` (see that file for its set-up and what each variant is). The client load itself (closed-loop
threads, latencies, server CPU) is ``peer_load.py``.

The same CPU budget for each: every server process is pinned (``sched_setaffinity``) to the same
``--server-threads`` N CPUs (default: all this process may use) and gets ``OMP_NUM_THREADS=MKL_NUM_THREADS=N``
(torch's intra-op threads) and ``TOKENIZERS_PARALLELISM=false``; ONNX Runtime gets N intra-op threads and 1
inter-op thread: promcse's ``--onnx-threads N``, Infinity's optimum engine through peer_infinity.py's launcher
(Infinity has no flag for it, and ONNX Runtime's default pins one thread per physical core itself, escaping the
CPU mask). The load generator runs in this process, unpinned, the same for every server.

For each round (``--rounds``; the server order rotates each round, because the box is noisy) and server: start
it, wait for ``/health``, ``--warmup`` seconds of unmeasured load, one request of ``CHECK_TEXTS`` texts whose
vectors are compared across servers, then the cells T (texts per request) in {1, 8} x C (concurrent clients) in
{32, 8}: C threads, each with one keep-alive ``httpx.Client``, send requests back to back (closed loop) for
``--seconds``; the server's CPU seconds (psutil, process and children) are read before and after. Then SIGTERM.
A request counts when it got 200 with T embeddings; anything else is an error.

Per cell and server (median over rounds): ``texts_s``, ``rps``, ``p50_ms``/``p99_ms`` (latency of the requests
in the window) and ``cpu_ms_per_text`` (the server's CPU time per embedded text: less sensitive than
throughput to what else runs on the box). Ratios of texts/s: ``promcse-onnx-int8`` over ``infinity-torch``,
over ``promcse-torch-unbatched`` (and over ``infinity-optimum-int8`` when it ran). Agreement: the cosine of each
server's vectors with the reference (the first fp32 server listed) must be >= 0.9999 for fp32 servers and
>= 0.98 for int8 ones, so that they do the same work. The exit status is 1 on any error, disagreement or
server that failed to start. The last line printed is the JSON headline.

Usage:
    python benchmarks/bench_serve_peers.py [--seconds 20] [--rounds 2] [--warmup 5]
        [--servers promcse-onnx-int8,promcse-torch-unbatched,promcse-torch,infinity-torch,infinity-optimum,
                   infinity-optimum-int8]   (the default: all but promcse-onnx)
        [--server-threads N] [--texts-per-request 1,8] [--clients 32,8] [--encoding-format float|base64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import psutil

import peer_infinity
from bench_serve import HOST, free_port, stop_server, wait_healthy
from peer_load import cell_stats, run_cell, vectors_of

CHECK_TEXTS = 16
FP32_TOLERANCE = 0.9999
INT8_TOLERANCE = 0.98


@dataclass(frozen=True)
class ServerSpec:
    """One server under test: promcse (its extra ``serve`` flags) or an Infinity variant."""

    name: str
    kind: str  # "promcse" | "infinity"
    flags: tuple[str, ...] = ()
    variant: str = ""
    int8: bool = False

    @property
    def route(self) -> str:
        return "/v1/embeddings" if self.kind == "promcse" else peer_infinity.ROUTE


SERVERS = {spec.name: spec for spec in (
    ServerSpec("promcse-onnx-int8", "promcse", ("--backend", "onnx", "--quantize", "int8"), int8=True),
    ServerSpec("promcse-onnx", "promcse", ("--backend", "onnx")),
    ServerSpec("promcse-torch", "promcse"),
    ServerSpec("promcse-torch-unbatched", "promcse", ("--batching", "off")),
    ServerSpec("infinity-torch", "infinity", variant="torch"),
    ServerSpec("infinity-optimum", "infinity", variant="optimum"),
    ServerSpec("infinity-optimum-int8", "infinity", variant="optimum-int8", int8=True),
)}
DEFAULT_SERVERS = ("promcse-onnx-int8,promcse-torch-unbatched,promcse-torch,infinity-torch,infinity-optimum,"
                   "infinity-optimum-int8")
RATIOS = (("promcse-onnx-int8", "infinity-torch"), ("promcse-onnx-int8", "promcse-torch-unbatched"),
          ("promcse-onnx-int8", "infinity-optimum-int8"), ("promcse-onnx-int8", "infinity-optimum"),
          ("promcse-torch", "infinity-torch"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=DEFAULT_SERVERS,
                        help=f"comma-separated, of {', '.join(SERVERS)} (default: {DEFAULT_SERVERS})")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per cell (default: 20)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all servers; medians reported (default: 2)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds of load after start (default: 5)")
    parser.add_argument("--texts-per-request", default="1,8", help="T values (default: 1,8)")
    parser.add_argument("--clients", default="32,8", help="C values: concurrent clients (default: 32,8)")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="CPUs each server is pinned to, and its torch/ONNX threads (default: all CPUs here)")
    parser.add_argument("--encoding-format", choices=("float", "base64"), default="float",
                        help="the requests' encoding_format (default: float, plain JSON numbers)")
    parser.add_argument("--infinity-batch-size", type=int, default=32, help="Infinity's --batch-size (default: 32)")
    parser.add_argument("--infinity-venv", type=Path, default=peer_infinity.DEFAULT_VENV)
    parser.add_argument("--work", type=Path, default=peer_infinity.DEFAULT_WORK,
                        help="Infinity's ONNX exports and HF_HOME (default: /tmp/promcse-infinity)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to come up")
    args = parser.parse_args()
    args.server_list = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in args.server_list if name not in SERVERS]
    if unknown or not args.server_list:
        parser.error(f"unknown server(s) {unknown}; choose from {', '.join(SERVERS)}")
    args.t_values = [int(v) for v in args.texts_per_request.split(",")]
    args.c_values = [int(v) for v in args.clients.split(",")]
    if args.seconds <= 0 or args.rounds < 1 or min(args.t_values + args.c_values) < 1:
        parser.error("--seconds, --rounds, T and C must be positive")
    available = sorted(os.sched_getaffinity(0))
    args.server_threads = args.server_threads or len(available)
    if not 1 <= args.server_threads <= len(available):
        parser.error(f"--server-threads must be 1..{len(available)}")
    args.cpus = available[:args.server_threads]
    return args


def sts_texts() -> list[str]:
    """Both sentence columns of the bundled STS test set, distinct, in file order."""
    path = resources.files("promcse").joinpath("resources", "data", "sts", "test.tsv")
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return list(dict.fromkeys(text.strip() for row in rows for text in row[:2] if text.strip()))


def pinned(cpus: list[int]) -> Callable[[], None]:
    """A ``preexec_fn`` pinning the child to ``cpus``."""
    return lambda: os.sched_setaffinity(0, cpus)


def start_server(spec: ServerSpec, args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    """Start ``spec`` on ``127.0.0.1:port`` with the shared CPU budget, its output to ``log``."""
    threads = str(args.server_threads)
    if spec.kind == "infinity":
        process = peer_infinity.start(spec.variant, port, log, work=args.work, venv=args.infinity_venv,
                                      batch_size=args.infinity_batch_size, threads=args.server_threads,
                                      preexec_fn=pinned(args.cpus), extra_env={"TOKENIZERS_PARALLELISM": "false"})
        return process
    argv = [sys.executable, "-m", "promcse", "serve", "--model", "minilm=minilm", "--host", HOST, "--port",
            str(port), "--device", "cpu", *spec.flags,
            *(["--onnx-threads", threads] if "onnx" in spec.flags else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads}
    with open(log, "w", encoding="utf-8") as sink:  # a file, not a pipe: access logs never block the server
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=pinned(args.cpus))


def body_of(spec: ServerSpec, texts: list[str], encoding_format: str) -> dict[str, Any]:
    if spec.kind == "infinity":
        return peer_infinity.request_body(texts, encoding_format)
    return {"input": texts, "model": "minilm", "encoding_format": encoding_format}


def measure_server(spec: ServerSpec, args: argparse.Namespace, texts: list[str], tmp: Path,
                   round_number: int) -> dict[str, Any]:
    """Start ``spec``, warm up, check vectors, run every cell, stop; what it measured."""
    port, log = free_port(), tmp / f"{spec.name}-r{round_number}.log"
    began = time.monotonic()
    url = f"http://{HOST}:{port}"
    out: dict[str, Any] = {"cells": {}, "errors": [], "exit_code": None}
    process = None
    try:
        process = start_server(spec, args, port, log)
        wait_healthy(process, url, time.monotonic() + args.start_timeout, log)
        out["startup_s"] = round(time.monotonic() - began, 1)
        server = psutil.Process(process.pid)
        body = lambda batch: body_of(spec, batch, args.encoding_format)  # noqa: E731
        if args.warmup > 0:
            warm = run_cell(url, spec.route, body, texts, max(args.t_values), min(args.c_values), args.warmup)
            out["errors"] += warm.errors
        check = httpx.post(url + spec.route, json=body_of(spec, texts[:CHECK_TEXTS], "float"), timeout=120)
        check.raise_for_status()
        out["vectors"] = vectors_of(check.json())
        for t in args.t_values:
            for c in args.c_values:
                result = run_cell(url, spec.route, body, texts, t, c, args.seconds, server)
                stats = cell_stats(result, t)
                out["cells"][f"T{t}_C{c}"] = stats
                out["errors"] += result.errors
                print(f"  round {round_number} {spec.name:24s} T={t:<2d} C={c:<3d} {stats['texts_s']:8.1f} texts/s "
                      f"{stats['rps']:7.1f} req/s  p50 {stats['p50_ms']:7.1f} ms  p99 {stats['p99_ms']:7.1f} ms  "
                      f"cpu {stats['cpu_ms_per_text']} ms/text  errors {stats['errors']}", flush=True)
        out["rss_mib"] = round(server.memory_info().rss / 2**20, 1)
    except SystemExit as failure:  # the server (or Infinity's ONNX export) did not come up
        out["errors"].append(str(failure)[:2000])
        print(f"  round {round_number} {spec.name}: failed to start:\n{str(failure)[-1500:]}", flush=True)
    finally:
        if process is not None:
            out["exit_code"] = stop_server(process)
    return out


def agreement(vectors: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    """Min cosine of each server's check vectors with the reference (the first fp32 server)."""
    fp32 = [n for n in names if not SERVERS[n].int8 and n in vectors]
    if not fp32:
        return {"reference": None, "note": "no fp32 server: nothing to compare with"}
    reference = vectors[fp32[0]]
    out: dict[str, Any] = {"reference": fp32[0], "servers": {}}
    for name in names:
        if name not in vectors:
            continue
        mine = vectors[name]
        cos = np.sum(mine * reference, axis=1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(reference, axis=1))
        bound = INT8_TOLERANCE if SERVERS[name].int8 else FP32_TOLERANCE
        norm = float(np.mean(np.linalg.norm(mine, axis=1)))
        out["servers"][name] = {"min_cosine": round(float(cos.min()), 6), "bound": bound,
                                "ok": bool(cos.min() >= bound), "mean_norm": round(norm, 4)}
    return out


def median_cells(per_round: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cell, the median of each number over the rounds."""
    cells: dict[str, dict[str, Any]] = {}
    names = sorted({cell for result in per_round for cell in result["cells"]})
    for cell in names:
        rows = [result["cells"][cell] for result in per_round if cell in result["cells"]]
        merged = {}
        for key in ("texts_s", "rps", "p50_ms", "p99_ms", "cpu_ms_per_text"):
            values = [row[key] for row in rows if row.get(key) is not None]
            merged[key] = round(statistics.median(values), 2) if values else None
        merged["errors"] = sum(row["errors"] for row in rows)
        merged["rounds"] = [row["texts_s"] for row in rows]
        cells[cell] = merged
    return cells


def versions(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    main = {}
    for name in ("promcse", "torch", "onnxruntime", "transformers", "tokenizers", "uvicorn", "httpx", "numpy"):
        try:
            main[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out: dict[str, Any] = {"main": main}
    if any(SERVERS[n].kind == "infinity" for n in names):
        out["infinity_venv"] = peer_infinity.infinity_versions(args.infinity_venv)
    return out


def run_rounds(args: argparse.Namespace, texts: list[str]) -> tuple[dict[str, list[dict[str, Any]]],
                                                                   dict[str, np.ndarray]]:
    """Every server measured once per round, the order rotated each round; the first vectors each server gave."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.server_list}
    vectors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve_peers_") as tmp:
        for number in range(1, args.rounds + 1):
            shift = (number - 1) % len(args.server_list)
            order = args.server_list[shift:] + args.server_list[:shift]
            print(f"round {number}: {', '.join(order)}", flush=True)
            for name in order:
                measured = measure_server(SERVERS[name], args, texts, Path(tmp), number)
                if "vectors" in measured:
                    vectors.setdefault(name, measured.pop("vectors"))
                results[name].append(measured)
    return results, vectors


def ratio_table(table: dict[str, dict[str, Any]], cells: list[str]) -> dict[str, dict[str, float | None]]:
    """texts/s of each RATIOS pair, per cell."""
    ratios: dict[str, dict[str, float | None]] = {}
    for top, bottom in RATIOS:
        if top in table and bottom in table:
            ratios[f"{top}/{bottom}"] = {
                cell: (round(table[top][cell]["texts_s"] / table[bottom][cell]["texts_s"], 2)
                       if cell in table[top] and cell in table[bottom] and table[bottom][cell]["texts_s"] else None)
                for cell in cells}
    return ratios


def print_report(args: argparse.Namespace, table: dict, cells: list[str], ratios: dict, agree: dict,
                 results: dict) -> None:
    print("\nmedian over rounds, texts/s (req/s; p50/p99 ms; server CPU ms/text):")
    print(f"{'server':26s}" + "".join(f"{cell:>36s}" for cell in cells))
    for name in args.server_list:
        row = table[name]
        print(f"{name:26s}" + "".join(
            f"{row[c]['texts_s']:>9.1f} ({row[c]['rps']:.0f}; {row[c]['p50_ms']:.0f}/{row[c]['p99_ms']:.0f}; "
            f"{row[c]['cpu_ms_per_text']})".rjust(36) if c in row else " " * 36 for c in cells))
    for key, values in ratios.items():
        print(f"ratio {key}: " + ", ".join(f"{cell} {value}" for cell, value in values.items()))
    for name, info in agree.get("servers", {}).items():
        print(f"agreement {name} vs {agree['reference']}: min cosine {info['min_cosine']} "
              f"(bound {info['bound']}) {'ok' if info['ok'] else 'DISAGREES'}; mean norm {info['mean_norm']}")
    for name, rounds in results.items():
        for r in rounds:
            for line in r["errors"][:3]:
                print(f"error {name}: {line[:300]}")


def headline_of(args: argparse.Namespace, table: dict, ratios: dict, agree: dict, results: dict,
                extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "servers": args.server_list, "cells": {name: table[name] for name in args.server_list}, "ratios": ratios,
        "agreement": agree, "errors": sum(len(r["errors"]) for rounds in results.values() for r in rounds),
        "failed_to_start": [name for name, rounds in results.items() if any("startup_s" not in r for r in rounds)],
        "server_exit": {name: [r["exit_code"] for r in rounds] for name, rounds in results.items()},
        "startup_s": {name: [r.get("startup_s") for r in rounds] for name, rounds in results.items()},
        "rss_mib": {name: [r.get("rss_mib") for r in rounds] for name, rounds in results.items()},
        "seconds": args.seconds, "rounds": args.rounds, "warmup_s": args.warmup,
        "server_threads": args.server_threads, "cpus": args.cpus, "encoding_format": args.encoding_format,
        "infinity_batch_size": args.infinity_batch_size, **extra,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "versions": versions(args, args.server_list),
    }


def main() -> int:
    args = parse_args()
    began = time.monotonic()
    texts = sts_texts()
    load0 = os.getloadavg()
    print(f"{len(texts)} STS texts; servers {args.server_list}; cells T in {args.t_values} x C in {args.c_values}, "
          f"{args.seconds:g} s each; {args.rounds} round(s); each server pinned to CPUs {args.cpus} with "
          f"{args.server_threads} thread(s); load average {load0[0]:.2f}", flush=True)
    results, vectors = run_rounds(args, texts)
    table = {name: median_cells(rounds) for name, rounds in results.items()}
    cells = sorted({cell for per in table.values() for cell in per}, key=lambda c: (int(c[1:].split("_")[0]),
                                                                                  -int(c.split("_C")[1])))
    ratios, agree = ratio_table(table, cells), agreement(vectors, args.server_list)
    print_report(args, table, cells, ratios, agree, results)
    headline = headline_of(args, table, ratios, agree, results, {
        "texts_pool": len(texts), "load_average_start": [round(v, 2) for v in load0],
        "wall_s": round(time.monotonic() - began, 1)})
    print(json.dumps(headline))
    ok = not headline["errors"] and not headline["failed_to_start"] and all(
        info["ok"] for info in agree.get("servers", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
