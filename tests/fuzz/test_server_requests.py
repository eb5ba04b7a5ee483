"""Fuzzing the HTTP API: hostile bodies get a 4xx with a JSON error (never a 500, a NaN, a null or a path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import fuzz_examples, make_prompt_checkpoint, make_sentences  # noqa: E402
from promcse.errors import PromcseError  # noqa: E402
from promcse.serving.launch import BackgroundServer, load_server  # noqa: E402
from promcse.corpus.search import Index  # noqa: E402
from promcse.serving.app import Limits, ServeOptions, create_app  # noqa: E402

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
FIELDS = {"/embed": ["texts", "model", "normalize"], "/similarity": ["a", "b", "model"],
          "/search": ["query", "index", "top_k", "threshold"],
          "/v1/embeddings": ["input", "model", "encoding_format", "dimensions", "user"]}
GOOD = {"/embed": {"texts": ["a dog"], "model": "news"}, "/similarity": {"a": ["a"], "b": ["b"]},
        "/search": {"query": "a dog runs", "top_k": 3}, "/v1/embeddings": {"input": ["a dog"], "model": "news"}}


@pytest.fixture(scope="module")
def server(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("fuzz-serve")
    models = {"news": str(make_prompt_checkpoint(tiny_bert, root / "news", length=3, std=0.1))}
    index = Index(models["news"], kind="flat", device="cpu")
    index.add(make_sentences(30, seed=5))
    index.save(root / "idx")
    registry, indexes = load_server(models, {"docs": str(root / "idx")}, device="cpu")
    limits = Limits(max_texts=8, max_chars=300, max_body_bytes=20_000, max_top_k=10)
    with BackgroundServer(create_app(registry, indexes, limits, ServeOptions())) as running:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            yield client, root


def assert_contract(response: httpx.Response, root: Path) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code >= 400:
        message = json.dumps(body)
        assert "error" in body and str(root) not in message and "/tmp/" not in message, message
        return
    for key in ("embeddings", "scores"):
        for row in body.get(key, []):
            assert all(isinstance(x, float) and math.isfinite(x) for x in row)
    for item in body.get("data", []):
        assert isinstance(item["embedding"], (list, str))


@settings(max_examples=fuzz_examples() * 5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(FIELDS)), data=st.data())
def test_hostile_bodies(server, path: str, data: st.DataObject) -> None:
    client, root = server
    body = dict(GOOD[path])
    for field in data.draw(st.lists(st.sampled_from(FIELDS[path] + ["extra"]), min_size=1, max_size=3, unique=True)):
        body[field] = data.draw(JSON_VALUES)
    assert_contract(client.post(path, json=body), root)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xef\xbb\xbf{}", b"\xff\xfe", b"[]", b"null", b'{"texts": ["\\ud800"]}',
                                 b'{"texts": ["\\ufeffhello"]}', b'{"texts": [' + b'"a",' * 9 + b'"a"]}'])
@pytest.mark.parametrize("path", sorted(FIELDS))
def test_malformed_bytes(server, path: str, raw: bytes) -> None:
    client, root = server
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert_contract(response, root)


def test_bom_text_is_refused_not_embedded(server) -> None:
    client, _ = server
    r = client.post("/embed", json={"texts": ["\ufeffhello"], "model": "news"})
    assert r.status_code == 422 and "byte-order mark" in r.json()["error"]["message"]


def test_tampered_indexes_and_models_stop_the_start(tiny_bert: Path, tmp_path: Path) -> None:
    model = str(make_prompt_checkpoint(tiny_bert, tmp_path / "m", length=3, std=0.1))
    index = Index(model, kind="numpy", device="cpu")
    index.add(make_sentences(10, seed=2))
    index.save(tmp_path / "idx")
    vectors = np.load(tmp_path / "idx" / "vectors.npy")
    vectors[3] = np.nan
    np.save(tmp_path / "idx" / "vectors.npy", vectors)
    with pytest.raises(PromcseError, match="non-finite|NaN|checksum|manifest"):
        load_server({"m": model}, {"docs": str(tmp_path / "idx")}, device="cpu")
