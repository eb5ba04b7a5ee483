"""``promcse serve --engine ray``: two Ray Serve replicas of the same app on a local Ray instance, the prompt named
in each request, the same vectors as the in-process model, the OpenAI route, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed: pip install -e '.[ray]'")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("ray.serve")

from conftest import make_prompt_checkpoint, make_sentences  # noqa: E402
from promcse.cli import main  # noqa: E402
import promcse.serving.ray_serve as ray_serve_module  # noqa: E402
from promcse.serving.ray_serve import APP_NAME, RayServeConfig, Replica, ReplicaSpec, serve_on_ray  # noqa: E402
from promcse.serving.registry import load_many  # noqa: E402

TEXTS = make_sentences(24, seed=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, original: Any, gave_up: threading.Event, deadline_s: float = 400.0) -> None:
    """Until ``/health`` answers and the SIGTERM handler is no longer ``original`` (serve_on_ray's is in)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not gave_up.is_set():
        try:
            if httpx.get(url + "health", timeout=2).status_code == 200 and signal.getsignal(signal.SIGTERM) != original:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the Ray Serve app did not come up")


def exercise(url: str, models: dict[str, str], found: dict[str, Any]) -> None:
    """Requests of both prompts, concurrently, plus /v1/embeddings, /models and /metrics; results into ``found``."""
    names = list(models)

    def embed(i: int) -> tuple[int, np.ndarray]:
        body = {"texts": TEXTS[i % 20 : i % 20 + 1 + i % 3], "model": names[i % 2], "normalize": False}
        answer = httpx.post(url + "embed", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return i, np.asarray(answer.json()["embeddings"])

    with ThreadPoolExecutor(8) as pool:
        found["embed"] = list(pool.map(embed, range(16)))
    found["openai"] = httpx.post(url + "v1/embeddings", json={"model": "legal", "input": TEXTS[:2]}, timeout=60).json()
    found["models"] = httpx.get(url + "models", timeout=30).json()
    found["metrics"] = httpx.get(url + "metrics", timeout=30).text
    found["unknown"] = httpx.post(url + "embed", json={"texts": ["a"], "model": "nope"}, timeout=30).status_code
    status = serve.status().applications[APP_NAME].deployments[APP_NAME]
    found["replicas"] = dict(status.replica_states)


def client(url: str, models: dict[str, str], found: dict[str, Any], gave_up: threading.Event) -> None:
    """Wait for the server, exercise it, then stop it with SIGTERM: whatever happened, as long as the handler
    is serve_on_ray's (never pytest's default one, which would end the test run)."""
    original = signal.getsignal(signal.SIGTERM)
    try:
        wait_until_up(url, original, gave_up)
        exercise(url, models, found)
    except BaseException as err:  # re-raised by the test in the main thread
        found["error"] = err
    finally:
        # Never leave the main thread blocked in serve_on_ray: on a slow box the app can come up after this
        # client gave up, so wait (bounded) for serve_on_ray's handler before signalling it.
        end = time.monotonic() + 600
        while signal.getsignal(signal.SIGTERM) == original and not gave_up.is_set() and time.monotonic() < end:
            time.sleep(0.5)
        if signal.getsignal(signal.SIGTERM) != original:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def models(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ray_serve")
    return {"news": str(make_prompt_checkpoint(tiny_bert, root / "news", seed=1, length=5, pooler="cls",
                                               head="always")),
            "legal": str(make_prompt_checkpoint(tiny_bert, root / "legal", seed=2, length=12))}


def test_two_replicas_answer_both_prompts_like_the_in_process_model_and_stop_on_sigterm(
        ray_local: Any, models: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    port, found, gave_up = free_port(), {}, threading.Event()
    url = f"http://127.0.0.1:{port}/"
    thread = threading.Thread(target=client, args=(url, models, found, gave_up), daemon=True)
    thread.start()
    argv = ["serve", "--engine", "ray", "--replicas", "2", "--device", "cpu", "--port", str(port)]
    status = main(argv + [arg for name, ref in models.items() for arg in ("--model", f"{name}={ref}")])
    gave_up.set()  # main returned: a client still waiting stops (and sends no signal)
    thread.join(timeout=30)
    if "error" in found:
        raise found["error"]
    assert status == 0 and "stopped by SIGTERM" in capsys.readouterr().out
    assert found["replicas"] == {"RUNNING": 2}
    reference = load_many(models, device="cpu")
    names = list(models)
    for i, vectors in found["embed"]:
        want = reference.encode(TEXTS[i % 20 : i % 20 + 1 + i % 3], names[i % 2], normalize=False)
        assert np.abs(vectors - want).max() <= 1e-5
    data = found["openai"]["data"]
    want = reference.encode(TEXTS[:2], "legal", normalize=True)
    assert found["openai"]["model"] == "legal" and np.abs(np.asarray([d["embedding"] for d in data]) - want).max() <= 1e-5
    assert [m["name"] for m in found["models"]["models"]] == names
    assert "promcse_requests_total" in found["metrics"] and found["unknown"] == 404
    assert APP_NAME not in serve.status().applications  # taken down; the session's Ray instance stays up
    assert ray.is_initialized()


def test_ray_options_are_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "m=minilm", "--replicas", "2"]) == 2
    assert "need --engine ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", "m=minilm", "--engine", "ray", "--replicas", "0"])
    assert main(["serve", "--model", "m=minilm", "--engine", "ray", "--host", "0.0.0.0"]) == 2  # no --api-key
    assert "--api-key" in capsys.readouterr().err
    with pytest.raises(Exception, match="key 'replicas': must be at least 1"):
        RayServeConfig(replicas=0).check()


def test_malloc_arenas_reach_each_replica_before_its_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(ray_serve_module, "limit_malloc_arenas", lambda n: calls.append(("arenas", n)) or True)
    monkeypatch.setattr(ray_serve_module, "load_server", lambda *a, **k: calls.append(("load", a[0])) or ({}, {}))
    monkeypatch.setattr(ray_serve_module, "create_app", lambda *a: "app")
    Replica(ReplicaSpec(models={"m": "minilm"}, malloc_arenas=3), threads=1)
    assert calls == [("arenas", 3), ("load", {"m": "minilm"})]
    calls.clear()
    Replica(ReplicaSpec(models={"m": "minilm"}), threads=1)  # 0: glibc's default, untouched
    assert calls == [("load", {"m": "minilm"})]


def test_serve_engine_ray_hands_the_arena_cap_to_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ReplicaSpec] = []
    monkeypatch.setattr(ray_serve_module, "serve_on_ray", lambda spec, config, **kw: seen.append(spec))
    monkeypatch.setattr("promcse.cli.serve.limit_malloc_arenas", lambda n: pytest.fail("capped in the launcher"))
    assert main(["serve", "--model", "m=minilm", "--engine", "ray", "--malloc-arenas", "4"]) == 0
    assert [spec.malloc_arenas for spec in seen] == [4]


def test_replicas_run_the_onnx_backend_they_are_given(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    loads: list[dict[str, object]] = []
    monkeypatch.setattr(ray_serve_module, "load_server", lambda *a, **k: loads.append(k) or ({}, {}))
    monkeypatch.setattr(ray_serve_module, "create_app", lambda *a: "app")
    Replica(ReplicaSpec(models={"m": "minilm"}, backend="onnx", quantize="int8"), threads=3)
    Replica(ReplicaSpec(models={"m": "minilm"}, backend="onnx", onnx_threads=2), threads=3)
    assert [(k["backend"], k["quantize"], k["threads"]) for k in loads] == [("onnx", "int8", 3), ("onnx", "none", 2)]
    seen: list[ReplicaSpec] = []
    monkeypatch.setattr(ray_serve_module, "serve_on_ray", lambda spec, config, **kw: seen.append(spec))
    argv = ["serve", "--model", "m=minilm", "--engine", "ray", "--backend", "onnx", "--quantize", "int8"]
    assert main(argv + ["--onnx-threads", "4"]) == 0
    assert [(s.backend, s.quantize, s.onnx_threads) for s in seen] == [("onnx", "int8", 4)]
    assert main(["serve", "--model", "m=minilm", "--engine", "ray", "--quantize", "int8"]) == 2  # torch + int8
    assert "onnx backend only" in capsys.readouterr().err and len(seen) == 1  # refused before deploying


def test_a_sigterm_while_the_replicas_start_stops_the_server_once_they_are_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, SIGTERM during the deployment met Ray's own handler: the process ended without taking the app down."""
    import ray

    done: list[str] = []

    class FakeServe:
        def shutdown(self) -> None:
            done.append("serve.shutdown")

    def deploy(*args: Any, **kwargs: Any) -> str:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the replicas start
        done.append("deployed")
        return "http://127.0.0.1:1/"

    monkeypatch.setattr(ray_serve_module, "_ray_serve", FakeServe)
    monkeypatch.setattr(ray_serve_module, "check_deployment", lambda *a, **k: None)
    monkeypatch.setattr(ray_serve_module, "deploy", deploy)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **k: done.append("ray.init"))
    monkeypatch.setattr(ray, "shutdown", lambda: done.append("ray.shutdown"))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stopped = serve_on_ray(ReplicaSpec(models={"m": "minilm"}), RayServeConfig())
    assert stopped == signal.SIGTERM
    assert done == ["ray.init", "deployed", "serve.shutdown", "ray.shutdown"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
