"""Closed-loop HTTP load for ``bench_serve_peers.py``: C client threads (keep-alive httpx) each sending T texts a
request for a fixed window, with latencies, errors, texts done and the server process's CPU time; and the
decoding of OpenAI-style embeddings responses (float lists or base64 float32)."""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import numpy as np
import psutil


def metric_values(url: str, prefixes: tuple[str, ...], headers: dict[str, str] | None = None) -> dict[str, float]:
    """The samples of a promcse server's ``/metrics`` whose lines start with one of ``prefixes``, by series name."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    response.raise_for_status()
    return {line.split()[0]: float(line.split()[1]) for line in response.text.splitlines()
            if line.startswith(prefixes)}


def vectors_of(payload: dict[str, Any]) -> np.ndarray:
    """The embeddings of an OpenAI-style response (float lists or base64 float32), in input order."""
    rows = sorted(payload["data"], key=lambda item: item.get("index", 0))
    out = []
    for item in rows:
        value = item["embedding"]
        out.append(np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str)
                   else np.asarray(value, dtype=np.float32))
    return np.stack(out)


@dataclass
class CellResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    texts: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0


def server_cpu(process: psutil.Process) -> float:
    """CPU seconds of the server process and its children so far."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def run_cell(url: str, route: str, body: Callable[[list[str]], dict[str, Any]], texts: list[str], t: int, c: int,
             seconds: float, server: psutil.Process | None = None) -> CellResult:
    """C closed-loop clients sending T texts a request (``body(texts)`` to ``route``) for ``seconds``; latencies,
    errors, texts done, and the server's CPU seconds over the window."""
    result = CellResult()
    lock = threading.Lock()
    barrier = threading.Barrier(c + 1)
    window: dict[str, float] = {}

    def client(number: int) -> None:
        latencies, errors, done = [], [], 0
        position = (number * 997 * t) % len(texts)
        with httpx.Client(base_url=url, timeout=120.0) as http:
            barrier.wait()
            end = window["end"]
            while time.perf_counter() < end:
                batch = [texts[(position + k) % len(texts)] for k in range(t)]
                position = (position + t) % len(texts)
                began = time.perf_counter()
                try:
                    response = http.post(route, json=body(batch))
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                    elif len(response.json()["data"]) != t:
                        errors.append(f"200 with {len(response.json()['data'])} embeddings for {t} texts")
                    else:
                        latencies.append(time.perf_counter() - began)
                        done += t
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    errors.append(f"{type(error).__name__}: {error}")
        with lock:
            result.latencies += latencies
            result.errors += errors
            result.texts += done

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(c)]
    for thread in threads:
        thread.start()
    cpu0 = server_cpu(server) if server else 0.0
    started = time.perf_counter()
    window["end"] = started + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started  # includes the requests still in flight at the window's end
    result.cpu_s = (server_cpu(server) - cpu0) if server else 0.0
    return result


def cell_stats(result: CellResult, t: int) -> dict[str, Any]:
    seconds = max(result.seconds, 1e-9)
    lat = np.array(result.latencies) * 1000.0
    p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"), float("nan")))
    return {"texts_s": round(result.texts / seconds, 1), "rps": round(len(result.latencies) / seconds, 1),
            "p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1), "requests": len(result.latencies),
            "errors": len(result.errors),
            "cpu_ms_per_text": round(1000.0 * result.cpu_s / result.texts, 2) if result.texts else None}
