"""Secrets and conformance: keys never in logs or reprs, non-ASCII keys, OpenAI-shaped 400/413 for bad bodies."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import make_prompt_checkpoint  # noqa: E402
from promcse.errors import PromcseError  # noqa: E402
from promcse.serving.app import Limits, ServeOptions, create_app  # noqa: E402
from promcse.serving.launch import BackgroundServer, check_server_options  # noqa: E402
from promcse.serving.registry import PromptRegistry  # noqa: E402

KEY = "clé-секрет-鍵-7f3a"  # non-ASCII, sent as UTF-8 bytes


@pytest.fixture(scope="module")
def registry(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptRegistry:
    reg = PromptRegistry(device="cpu")
    reg.add("news", make_prompt_checkpoint(tiny_bert, tmp_path_factory.mktemp("conf") / "news", seed=1, length=3))
    return reg


def auth(key: str = KEY) -> dict[str, bytes]:
    return {"Authorization": b"Bearer " + key.encode("utf-8"), "Content-Type": b"application/json"}


def test_a_non_ascii_key_works_as_utf8_bytes_and_a_wrong_one_does_not(registry: PromptRegistry) -> None:
    with BackgroundServer(create_app(registry, {}, Limits(), ServeOptions(api_key=KEY))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        ok = client.post("/v1/embeddings", content=json.dumps({"input": ["a dog"], "model": "news"}).encode(),
                         headers=auth())
        assert ok.status_code == 200, ok.text
        assert client.post("/v1/embeddings", json={"input": ["a dog"], "model": "news"},
                           headers={"Authorization": "Bearer x"}).status_code == 401
        assert client.get("/v1/models", headers=auth(KEY[:-1])).status_code == 401


def test_keys_that_no_header_can_carry_are_refused_at_start() -> None:
    for bad in ("", "two words", "tab\tkey", "nl\nkey", "\x00null"):
        with pytest.raises(PromcseError) as info:
            check_server_options(8000, 30, api_key=bad)
        assert info.value.key == "api_key" and (not bad or bad not in str(info.value))
    check_server_options(8000, 30, api_key=KEY)  # any script is fine


def test_the_key_is_in_no_repr() -> None:
    assert KEY not in repr(ServeOptions(api_key=KEY))


@pytest.mark.parametrize("body, headers", [
    (b'{"input": ["\xff\xfe"]}', {}),                                                   # invalid UTF-8
    (gzip.compress(b'{"input": ["a dog"]}'), {"Content-Encoding": "gzip"}),             # a gzip body
    (b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}),                              # deep nesting
    (b'{"input": ["a"], "dimensions": ' + b"9" * 5000 + b"}", {}),                       # 5,000-digit integer
    (b'{"input": ', {}),                                                                # truncated
])
def test_malformed_bodies_get_openai_shaped_400(registry: PromptRegistry, body: bytes, headers: dict) -> None:
    with BackgroundServer(create_app(registry, {}, Limits(), ServeOptions())) as server:
        r = httpx.post(server.url + "/v1/embeddings", content=body,
                       headers={"Content-Type": "application/json", **headers}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:200])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_a_body_over_the_limit_gets_openai_shaped_413(registry: PromptRegistry) -> None:
    with BackgroundServer(create_app(registry, {}, Limits(max_body_bytes=200), ServeOptions())) as server:
        declared = httpx.post(server.url + "/v1/embeddings", json={"input": ["x" * 500]}, timeout=30)
        ours = httpx.post(server.url + "/embed", json={"texts": ["x" * 500]}, timeout=30)
    assert declared.status_code == 413 and set(declared.json()["error"]) == {"message", "type", "param", "code"}
    assert ours.status_code == 413 and ours.json()["error"]["status"] == 413  # our routes keep our shape


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_key_never_reaches_the_server_log_or_metrics(tiny_bert: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "PROMCSE_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "promcse", "serve", "--model", f"tiny={tiny_bert}", "--port",
                                 str(port), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/v1/embeddings", content=b'{"input": ["a"], "model": "tiny"}',
                               headers=auth()).status_code == 200
            client.post("/v1/embeddings", content=b'{"input": ["a"], "model": "tiny"}', headers=auth(KEY + "x"))
            client.post("/v1/embeddings", content=b'{"input": ', headers=auth())
            metrics = client.get("/metrics", headers=auth()).text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_bytes().decode("utf-8", "replace")
    assert "POST /v1/embeddings" in text  # the log was written
    for form in (KEY, KEY.encode("utf-8").decode("latin-1")):
        assert form not in text and form not in metrics
