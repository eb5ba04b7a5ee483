"""Response bodies: float32 vectors written by orjson read back to the server's exact float32 numbers (the
standard library fallback too), and a model that turns non-finite is a 500 naming it, never a 200 with NaN/null."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_prompt_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
orjson = pytest.importorskip("orjson")
from promcse.serving.app import Limits, create_app  # noqa: E402
from promcse.serving.context import ServeOptions, json_bytes  # noqa: E402
from promcse.serving.launch import BackgroundServer, load_server  # noqa: E402

TEXTS = ["a cat sat on the mat", "the stock market fell sharply today", "x"]


@pytest.fixture(scope="module")
def live(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("json")
    models = {"legal": str(make_prompt_checkpoint(tiny_bert, root / "legal", length=3, seed=2))}
    registry, _ = load_server(models, {}, device="cpu")
    app = create_app(registry, {}, Limits(), ServeOptions())
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, registry


def float32_rows(values: list[list[float]]) -> np.ndarray:
    return np.array(values, dtype=np.float64).astype(np.float32)


def test_vectors_read_back_to_the_servers_float32_numbers(live: Any) -> None:
    client, registry = live
    raw = np.asarray(registry.encode(TEXTS, registry.get("legal"), normalize=False), dtype=np.float32)
    unit = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    openai = client.post("/v1/embeddings", json={"input": TEXTS, "model": "legal"})
    assert openai.status_code == 200 and openai.headers["content-type"] == "application/json"
    got = float32_rows([d["embedding"] for d in openai.json()["data"]])
    assert float(np.abs(got - unit).max()) <= 1e-6  # same vectors...
    mantissas = re.findall(r"-?(\d+)\.(\d+)(?:e[-+]?\d+)?", openai.text)
    assert len(mantissas) >= 3 * 32  # float32's shortest form: at most 9 significant digits (float64's: 17)
    assert max(len((a + b).lstrip("0")) for a, b in mantissas) <= 9
    native = client.post("/embed", json={"texts": TEXTS, "model": "legal", "normalize": False})
    assert float(np.abs(float32_rows(native.json()["embeddings"]) - raw).max()) <= 1e-6
    scores = client.post("/similarity", json={"a": TEXTS[:2], "b": TEXTS[1:], "model": "legal"}).json()["scores"]
    assert np.asarray(scores).shape == (2, 2) and abs(scores[1][0] - 1.0) < 1e-5  # the same sentence


def test_json_bytes_round_trips_float32_exactly_with_and_without_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 7)).astype(np.float32) * np.float32(1e-3)
    content = {"data": [{"embedding": v} for v in vectors], "strided": vectors[:, ::2], "n": np.int64(3), "s": "é"}
    fast = json.loads(json_bytes(content))
    assert np.array_equal(float32_rows([d["embedding"] for d in fast["data"]]), vectors)  # bit for bit
    assert np.array_equal(float32_rows(fast["strided"]), vectors[:, ::2]) and fast["n"] == 3 and fast["s"] == "é"
    monkeypatch.setitem(__import__("sys").modules, "orjson", None)  # as if the extra were not installed
    plain = json.loads(json_bytes(content))
    assert np.array_equal(float32_rows(plain["strided"]), vectors[:, ::2]) and plain["s"] == "é"
    with pytest.raises(ValueError):
        json_bytes({"x": float("nan")})
    with pytest.raises(TypeError, match="set is not JSON serialisable"):
        json_bytes({"x": {1}})


def test_a_model_gone_non_finite_is_a_500_not_a_200_with_nan(live: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client, registry = live
    honest = registry.encode_rows

    def damaged(texts: Any, models: Any, batch_size: int = 64) -> list[np.ndarray]:
        rows = honest(texts, models, batch_size)  # the engine's forward pass, then one row turned NaN
        return [np.full_like(rows[0], np.nan), *rows[1:]]

    monkeypatch.setattr(registry, "encode_rows", damaged)  # what a model damaged after start-up would give
    for route, body in (("/v1/embeddings", {"input": TEXTS, "model": "legal"}),
                        ("/embed", {"texts": TEXTS, "model": "legal"})):
        r = client.post(route, json=body)
        assert r.status_code == 500, (route, r.text)
        assert "non-finite" in r.json()["error"]["message"] and "embedding" not in r.text
    monkeypatch.undo()
    assert client.post("/v1/embeddings", json={"input": TEXTS, "model": "legal"}).status_code == 200
