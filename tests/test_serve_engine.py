"""The batching engine behind the server, the OpenAI embeddings API, metrics, backpressure, timeouts, auth."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import make_prompt_checkpoint, make_sentences  # noqa: E402
from promcse.serving.batching import BatchEngine, EngineConfig, QueueFull  # noqa: E402
from promcse.errors import PromcseError  # noqa: E402
from promcse.serving.launch import BackgroundServer, check_server_options  # noqa: E402
from promcse.serving.registry import PromptRegistry  # noqa: E402
from promcse.serving.app import Limits, ServeOptions, create_app  # noqa: E402

TEXTS = make_sentences(48, seed=21)


@pytest.fixture(scope="module")
def registry(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptRegistry:
    root = tmp_path_factory.mktemp("engine")
    reg = PromptRegistry(device="cpu")
    reg.add("news", make_prompt_checkpoint(tiny_bert, root / "news", seed=1, length=5, pooler="cls", head="always"))
    reg.add("legal", make_prompt_checkpoint(tiny_bert, root / "legal", seed=2, length=12, shift_positions=False))
    reg.add("bare", str(tiny_bert))
    return reg


def serve(registry: PromptRegistry, **options: object) -> BackgroundServer:
    return BackgroundServer(create_app(registry, {}, Limits(), ServeOptions(**options)))  # type: ignore[arg-type]


def slow(registry: PromptRegistry, monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[int]:
    """Make every forward pass take ``seconds``; return the list of batch sizes it saw."""
    seen: list[int] = []
    original = registry.encode_rows

    def encode_rows(texts, models, batch_size=64):  # noqa: ANN001, ANN202
        seen.append(len(texts))
        time.sleep(seconds)
        return original(texts, models, batch_size)

    monkeypatch.setattr(registry, "encode_rows", encode_rows)
    return seen


def test_concurrent_requests_of_mixed_prompts_share_batches_and_get_their_own_vectors(registry) -> None:
    names = ["news", "legal", "bare"]
    with serve(registry, engine=EngineConfig(max_wait_ms=20)) as server, httpx.Client(base_url=server.url) as client:
        def call(i: int) -> tuple[int, list[list[float]]]:
            texts = TEXTS[i % 40 : i % 40 + 1 + i % 4]
            r = client.post("/embed", json={"texts": texts, "model": names[i % 3], "normalize": False}, timeout=30)
            assert r.status_code == 200, r.text
            return i, r.json()["embeddings"]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(48)))
        stats = server.server.config.app.state.context.engine.stats
    for i, vectors in results:
        texts = TEXTS[i % 40 : i % 40 + 1 + i % 4]
        want = registry.encode(texts, names[i % 3], normalize=False)
        assert np.abs(np.asarray(vectors) - want).max() <= 1e-5
    assert stats.rows == sum(1 + i % 4 for i in range(48))
    assert stats.batches < 48, "requests were not batched together"


def test_full_queue_answers_503_with_retry_after(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    slow(registry, monkeypatch, 0.3)
    with serve(registry, engine=EngineConfig(max_queue_tokens=40, max_wait_ms=0)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda t: client.post("/embed", json={"texts": [t] * 3, "model": "news"}),
                                    TEXTS[:12]))
    codes = [r.status_code for r in answers]
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]["message"]


def test_request_timeout_answers_504_and_drops_the_work(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = slow(registry, monkeypatch, 0.6)
    with serve(registry, engine=EngineConfig(max_batch_tokens=16, max_wait_ms=0), request_timeout_s=0.3) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/embed", json={"texts": TEXTS[:6], "model": "news"})
        assert r.status_code == 504 and "no result within" in r.json()["error"]["message"]
        time.sleep(1.0)
    assert sum(seen) < 6, f"the cancelled request's remaining texts were still encoded: {seen}"


def test_after_a_504_the_next_small_request_is_served_not_refused(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The timed-out job's remaining texts leave the queue at once, not when the busy model thread looks: a big
    request that filled the queue times out, and a small one right after is admitted (503 before) and served."""
    big = [" ".join(TEXTS[i : i + 3]) for i in range(12)]
    tokens = sum(registry.token_counts(big, "news"))
    original = registry.encode_rows

    def encode_rows(texts, models, batch_size=64):  # noqa: ANN001, ANN202 - only the big request's rows are slow
        if any(t in big for t in texts):
            time.sleep(0.6)
        return original(texts, models, batch_size)

    monkeypatch.setattr(registry, "encode_rows", encode_rows)
    engine = EngineConfig(max_batch_tokens=max(registry.token_counts(big, "news")), max_queue_tokens=tokens - 40,
                          max_wait_ms=0)  # the big request alone is admitted (empty queue), one row per batch
    with serve(registry, engine=engine, request_timeout_s=0.5) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        first = client.post("/embed", json={"texts": big, "model": "news"})
        assert first.status_code == 504
        second = client.post("/embed", json={"texts": TEXTS[:1], "model": "news"})
        assert second.status_code == 200, second.text


def test_client_that_disconnects_leaves_no_work(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = slow(registry, monkeypatch, 0.4)
    with serve(registry, engine=EngineConfig(max_batch_tokens=16, max_wait_ms=0)) as server:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/embed", json={"texts": TEXTS[:8], "model": "legal"}, timeout=0.5)
        time.sleep(1.5)
        engine = server.server.config.app.state.context.engine
        assert engine.queued_jobs == 0 and engine.queued_tokens == 0
    assert sum(seen) < 8, f"the abandoned request was encoded to the end: {seen}"


def test_engine_alone_refuses_when_full_and_drains_on_close(registry) -> None:
    engine = BatchEngine(registry, EngineConfig(max_queue_tokens=5, max_wait_ms=50))
    first = engine.submit(["a dog runs on the beach today"], "news")  # over the bound alone: admitted (queue empty)
    with pytest.raises(QueueFull):
        engine.submit(["a cat"], "news")
    engine.close()
    assert first.future.result(timeout=10).shape == (1, 32)
    with pytest.raises(PromcseError, match="shutting down"):
        engine.submit(["late"], "news")
    with pytest.raises(PromcseError, match="key 'max_batch_tokens'"):
        EngineConfig(max_batch_tokens=0).check()


def test_openai_client_against_the_live_server(registry) -> None:
    openai = pytest.importorskip("openai")
    with serve(registry) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        out = client.embeddings.create(model="legal", input=TEXTS[:3])  # the client asks for base64 by default
        floats = client.embeddings.create(model="legal", input=TEXTS[0], encoding_format="float")
        short = client.embeddings.create(model="news", input=TEXTS[:2], dimensions=8)
        assert [m.id for m in client.models.list().data] == ["news", "legal", "bare"]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="nope", input="x")
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model="news", input=[[1, 2, 3]])  # token arrays are not taken
        assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["param"].startswith("input")
    want = registry.encode(TEXTS[:3], "legal", normalize=True)
    got = np.asarray([d.embedding for d in out.data])
    assert [d.index for d in out.data] == [0, 1, 2] and np.abs(got - want).max() <= 1e-5
    assert np.abs(np.asarray(floats.data[0].embedding) - want[0]).max() <= 1e-5
    assert out.usage.prompt_tokens == sum(registry.token_counts(TEXTS[:3], "legal")) == out.usage.total_tokens
    short_vectors = np.asarray([d.embedding for d in short.data])
    assert short_vectors.shape == (2, 8) and np.allclose(np.linalg.norm(short_vectors, axis=1), 1, atol=1e-5)


def test_metrics_count_requests_batches_and_queue(registry) -> None:
    with serve(registry) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/embed", json={"texts": TEXTS[:4], "model": "news"}).status_code == 200
        assert client.post("/embed", json={"texts": ["x"], "model": "missing"}).status_code == 404
        text = client.get("/metrics").text
    assert 'promcse_requests_total{endpoint="/embed",model="news",status="200"} 1.0' in text
    assert 'promcse_requests_total{endpoint="/embed",model="-",status="404"} 1.0' in text
    assert "promcse_batch_rows_count 1.0" in text and "promcse_queue_tokens 0.0" in text
    assert 'promcse_request_seconds_bucket{endpoint="/embed"' in text


def test_api_key_and_host_check(registry) -> None:
    with serve(registry, api_key="s3cret", allowed_hosts=("127.0.0.1",)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"texts": ["a dog"], "model": "news"}
        denied = client.post("/embed", json=body)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert client.post("/embed", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/embed", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200  # open: probes and the page need no key
        v1 = client.post("/v1/embeddings", json={"input": "x", "model": "news"})
        assert v1.status_code == 401 and v1.json()["error"]["type"] == "authentication_error"
        rebound = client.get("/health", headers={"Host": "evil.example:80"})
        assert rebound.status_code == 400 and "Host" in rebound.json()["error"]["message"]


def test_non_loopback_bind_needs_a_key_or_insecure() -> None:
    with pytest.raises(PromcseError, match="key 'host': 0.0.0.0 is reachable .* set api_key"):
        check_server_options(8000, 30, host="0.0.0.0")
    check_server_options(8000, 30, host="0.0.0.0", api_key="k")
    check_server_options(8000, 30, host="0.0.0.0", insecure=True)


def test_batching_off_keeps_the_one_request_path(registry) -> None:
    with serve(registry, engine=None) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/embed", json={"texts": TEXTS[:3], "model": "bare", "normalize": False})
        assert client.get("/models").json()["batching"] is False
    assert np.abs(np.asarray(r.json()["embeddings"]) - registry.encode(TEXTS[:3], "bare", normalize=False)).max() <= 1e-5


def test_engine_trims_the_heap_when_its_queue_drains(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: malloc_trim runs once the queue is empty (not while rows wait), at most every TRIM_INTERVAL_S."""
    import promcse.serving.batching as batching

    events: list[str] = []
    monkeypatch.setattr(batching, "malloc_trim", lambda: events.append("trim") or True)
    monkeypatch.setattr(batching, "TRIM_INTERVAL_S", 0.0)
    original, later = registry.encode_rows, []

    def encode_rows(texts, models, batch_size=64):  # noqa: ANN001, ANN202
        events.append("encode")
        if not later:  # a request arrives while the first batch runs: the queue has not drained after it
            later.append(engine.submit([TEXTS[1]], "news"))
        return original(texts, models, batch_size)

    monkeypatch.setattr(registry, "encode_rows", encode_rows)
    engine = BatchEngine(registry, EngineConfig(max_wait_ms=0))
    try:
        engine.submit([TEXTS[0]], "news").future.result(timeout=30)
        later[0].future.result(timeout=30)
        deadline = time.monotonic() + 10
        while "trim" not in events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events == ["encode", "encode", "trim"]
        assert engine.stats.trims == 1

        monkeypatch.setattr(batching, "TRIM_INTERVAL_S", 3600.0)  # drained again, but trimmed a moment ago
        engine.submit([TEXTS[2]], "news").future.result(timeout=30)
        time.sleep(0.1)
        assert events.count("trim") == 1
    finally:
        engine.close()

    off = BatchEngine(registry, EngineConfig(idle_trim=False, max_wait_ms=0))
    monkeypatch.setattr(batching, "TRIM_INTERVAL_S", 0.0)
    try:
        off.submit([TEXTS[3]], "news").future.result(timeout=30)
        time.sleep(0.1)
    finally:
        off.close()
    assert events.count("trim") == 1 and off.stats.trims == 0


def test_malloc_trim_is_a_safe_call_everywhere() -> None:
    import sys

    from promcse.io.allocator import malloc_trim

    assert malloc_trim() in (True, False)
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert malloc_trim() is True


def test_malloc_arena_cap_is_set_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: ``promcse serve`` caps glibc's arenas (``--malloc-arenas``, default 2) before it loads anything;
    0 leaves glibc's default. The real ``mallopt`` runs in a child, so this test process keeps its allocator."""
    import subprocess
    import sys

    import promcse.cli.serve as serve_cli
    from promcse.cli import main

    calls: list[object] = []

    def stop(*args: object, **kwargs: object) -> None:
        calls.append("load")
        raise PromcseError("stop here")

    monkeypatch.setattr(serve_cli, "limit_malloc_arenas", lambda n: calls.append(n) or True)
    monkeypatch.setattr(serve_cli, "load_server", stop)
    assert main(["serve", "--model", "m=unused"]) == 2 and calls == [2, "load"]
    calls.clear()
    assert main(["serve", "--model", "m=unused", "--malloc-arenas", "0"]) == 2 and calls == ["load"]
    with pytest.raises(SystemExit) as exit_info:  # refused by the option's range, before anything runs
        main(["serve", "--model", "m=unused", "--malloc-arenas", "-1"])
    assert exit_info.value.code == 2 and calls == ["load"]
    code = ("import sys, platform; from promcse.io.allocator import limit_malloc_arenas as f; "
            "glibc = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'; "
            "sys.exit(0 if (f(2) is glibc and f(0) is False) else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
