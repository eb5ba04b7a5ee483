"""The load of ``bench_serve.py``: the texts, the request plan (good and bad requests, each with the status it must
get), the optional second model of another width, and one round of concurrent clients."""

from __future__ import annotations

import queue
import random
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np

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
