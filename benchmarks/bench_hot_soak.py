"""Hot-load soak: prompts added, replaced and removed while ``--clients`` clients embed through them.

Starts ``promcse serve --prompts DIR --keys KEYS`` (bundled all-MiniLM-L6-v2; ``--backend`` torch or onnx) in a
subprocess on 127.0.0.1 with ``--initial`` random prompts (P uniform in [10, 20]) in the store. For
``--seconds``: an admin thread PUTs one prompt per second (a new name, or a new version of a live one, half each)
and DELETEs one every 5 s; ``--clients`` threads send ``POST /v1/embeddings`` for one probe text under a random
prompt name among those ever added. Every 200 names the version it used (``model_version``); the client checks the
vector against the version's own (computed locally with ``promcse.load`` when the admin thread wrote it), so a
vector from the wrong version, or from no prompt at all, is counted. A 404 is *intended* when its name was
deleted (or not yet added) at some time during the request; any other non-200 is a failure. The server's RSS is
read every 10 s, with the prompt cache's size (its metric ``promcse_prompt_cache_bytes``): RSS minus the cache is
what the server holds besides the prompts it is allowed to keep (``--cache-mb``).

The last line printed is JSON: requests, failures, intended 404s, wrong-version vectors, PUTs and DELETEs done,
RSS first/last/max (MiB), RSS, cache and RSS minus cache every 10 s. Exit status 1 on any failure or wrong vector.

Usage: python benchmarks/bench_hot_soak.py [--seconds 300] [--clients 16] [--initial 20] [--backend torch]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, stop_server, wait_healthy  # noqa: E402

PROBE = "The court adjourned until Monday."
KEY = "sk-soak-admin"


@dataclass
class Ledger:
    """What the admin thread did (guarded by ``lock``) and what the clients saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # version -> unit vector of PROBE
    names: list[str] = field(default_factory=list)  # every name ever added
    gone: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> (deleted, re-added) spans
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    intended_404: int = 0
    wrong: int = 0
    puts: int = 0
    deletes: int = 0


def write_prompt(root: Path, name: str, seed: int, encoder) -> Path:  # noqa: ANN001
    """A random prompt checkpoint (P in [10, 20]) over ``encoder``'s backbone, written under ``root/name``."""
    import torch

    from promcse.encoder.model import EncoderSpec, build_encoder
    from promcse.encoder.prompt import PromptSpec
    from promcse.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    shape = encoder.spec.shape
    length = random.Random(seed).randint(10, 20)
    spec = EncoderSpec("minilm", shape, mode="prompt", pooler="avg", prompt=PromptSpec.for_backbone(shape, length))
    model = build_encoder(spec, encoder.backbone, encoder.tokenizer)
    with torch.no_grad():
        model.prompt.embedding.weight.normal_(0, 0.5)
    return save_checkpoint(model, root / name)


def version_and_vector(folder: Path, encoder) -> tuple[str, np.ndarray]:  # noqa: ANN001
    import promcse
    from promcse.serving.prompt_files import folder_version

    model = promcse.load(str(folder), device="cpu", backbones=lambda name: (encoder.backbone, encoder.tokenizer))
    return folder_version(folder), model.encode([PROBE], normalize_embeddings=True)[0]


def files_of(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): base64.b64encode(p.read_bytes()).decode()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def admin(url: str, stop: float, ledger: Ledger, scratch: Path, encoder) -> None:  # noqa: ANN001
    """One PUT per second (new name or new version), one DELETE every 5 s."""
    import httpx

    rng, tick, seed = random.Random(7), 0, 10_000
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        while time.time() < stop:
            began, tick, seed = time.time(), tick + 1, seed + 1
            with ledger.lock:
                live = [n for n in ledger.names if not _gone_now(ledger, n)]
            name = rng.choice(live) if live and rng.random() < 0.5 else f"p{seed}"
            folder = write_prompt(scratch / str(seed), name, seed, encoder)
            version, vector = version_and_vector(folder, encoder)
            with ledger.lock:
                ledger.expected[version] = vector
            r = client.put(f"/v1/prompts/{name}", json={"files": files_of(folder)})
            with ledger.lock:
                ledger.puts += 1
                if r.status_code not in (200, 201):
                    ledger.failures.append(f"PUT {name}: {r.status_code} {r.text[:200]}")
                elif name not in ledger.names:
                    ledger.names.append(name)
                else:
                    _mark_back(ledger, name)
            if tick % 5 == 0 and live:
                victim = rng.choice(live)
                with ledger.lock:
                    ledger.gone.setdefault(victim, []).append((time.time(), float("inf")))
                r = client.delete(f"/v1/prompts/{victim}")
                with ledger.lock:
                    ledger.deletes += 1
                    if r.status_code not in (200, 204):
                        ledger.failures.append(f"DELETE {victim}: {r.status_code}")
            time.sleep(max(0.0, 1.0 - (time.time() - began)))


def _gone_now(ledger: Ledger, name: str) -> bool:
    spans = ledger.gone.get(name, [])
    return bool(spans) and spans[-1][1] == float("inf")


def _mark_back(ledger: Ledger, name: str) -> None:
    spans = ledger.gone.get(name)
    if spans and spans[-1][1] == float("inf"):
        spans[-1] = (spans[-1][0], time.time())


def _intended(ledger: Ledger, name: str, sent: float, done: float) -> bool:
    """A 404 is intended when the name was deleted during or before the request and not back before it."""
    return any(start <= done and end >= sent for start, end in ledger.gone.get(name, []))


def client_loop(url: str, stop: float, ledger: Ledger, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        while time.time() < stop:
            with ledger.lock:
                names = list(ledger.names)
            name, sent = rng.choice(names), time.time()
            try:
                r = client.post("/v1/embeddings", json={"input": [PROBE], "model": name})
            except httpx.HTTPError as err:
                with ledger.lock:
                    ledger.requests += 1
                    ledger.failures.append(f"{name}: {type(err).__name__}")
                continue
            check(ledger, name, sent, r)


def check(ledger: Ledger, name: str, sent: float, r) -> None:  # noqa: ANN001
    done = time.time()
    with ledger.lock:
        ledger.requests += 1
        if r.status_code == 404 and _intended(ledger, name, sent, done):
            ledger.intended_404 += 1
        elif r.status_code != 200:
            ledger.failures.append(f"{name}: {r.status_code} {r.text[:120]}")
        else:
            body = r.json()
            want = ledger.expected.get(body.get("model_version"))
            got = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
            if want is None or float(np.abs(got - want).max()) > 1e-4:
                ledger.wrong += 1


def cache_mib(url: str) -> float:
    """The server's prompt cache (MiB of prompt tensors loaded now), from its metrics."""
    from peer_load import metric_values

    values = metric_values(url, ("promcse_prompt_cache_bytes ",), {"Authorization": f"Bearer {KEY}"})
    return values["promcse_prompt_cache_bytes"] / 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--initial", type=int, default=20)
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--cache-mb", type=float, default=64.0)
    return parser.parse_args()


def start(args: argparse.Namespace, root: Path, ledger: Ledger, encoder) -> tuple[subprocess.Popen, str]:  # noqa: ANN001
    store = root / "store"
    for k in range(args.initial):
        folder = write_prompt(store, f"p{k}", k, encoder)
        version, vector = version_and_vector(folder, encoder)
        ledger.expected[version] = vector
        ledger.names.append(f"p{k}")
    (root / "keys.json").write_text(json.dumps({KEY: {"prompts": ["*"], "admin": True, "metrics": True}}))
    port = free_port()
    argv = [sys.executable, "-m", "promcse", "serve", "--prompts", str(store), "--keys", str(root / "keys.json"),
            "--port", str(port), "--backend", args.backend, "--prompt-cache-mb", str(args.cache_mb),
            "--store-backbone", "minilm"]  # uploads may use only a backbone the server holds
    log = root / "server.log"
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, time.time() + 300, log)
    return process, url


def main() -> int:
    args = parse_args()
    import psutil

    import promcse

    encoder = promcse.load("minilm", device="cpu")
    ledger = Ledger()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start(args, Path(tmp), ledger, encoder)
        server, rss, cache = psutil.Process(process.pid), [], []
        stop = time.time() + args.seconds
        threads = [threading.Thread(target=admin, args=(url, stop, ledger, Path(tmp) / "scratch", encoder))]
        threads += [threading.Thread(target=client_loop, args=(url, stop, ledger, k)) for k in range(args.clients)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            rss.append(server.memory_info().rss / 2**20)
            cache.append(cache_mib(url))
            time.sleep(10)
        exit_code = stop_server(process)
    headline = {"seconds": args.seconds, "clients": args.clients, "backend": args.backend,
                "requests": ledger.requests, "failures": len(ledger.failures), "intended_404": ledger.intended_404,
                "wrong_version_vectors": ledger.wrong, "puts": ledger.puts, "deletes": ledger.deletes,
                "rss_mib_first_last_max": [round(rss[0], 1), round(rss[-1], 1), round(max(rss), 1)],
                "rss_mib_every_10s": [round(x) for x in rss], "cache_mib_every_10s": [round(x) for x in cache],
                "rss_minus_cache_mib_every_10s": [round(x - y) for x, y in zip(rss, cache)],
                "cache_mb": args.cache_mb, "server_exit": exit_code}
    for failure in ledger.failures[:10]:
        print("failure:", failure)
    print(json.dumps(headline))
    return 1 if ledger.failures or ledger.wrong or exit_code != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
