"""The shipped domain prompts (checkpoints/promcse-minilm-{scifact,nfcorpus}-query): query-only role pairs over the
bundled MiniLM, small, and served together with the frozen backbone: rows of every model and role share batches and
get their own model's vectors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from promcse.models.loading import load

ROOT = Path(__file__).parents[1] / "checkpoints"
PAIRS = {"scifact": ROOT / "promcse-minilm-scifact-query", "nfcorpus": ROOT / "promcse-minilm-nfcorpus-query"}
TEXTS = ["Vitamin D deficiency is linked to depression.", "Statins lower the risk of breast cancer death.",
         "What foods are high in fibre?", "Green tea extract and liver damage", "Microbiome changes after antibiotics"]


@pytest.mark.parametrize("name", list(PAIRS))
def test_shipped_pair_is_a_small_query_only_prompt(name: str) -> None:
    pair = PAIRS[name]
    assert json.loads((pair / "roles.json").read_text())["document"] is None
    assert (pair / "query" / "prompt.safetensors").stat().st_size < 1_000_000
    meta = json.loads((pair / "query" / "config.json").read_text())["adapt"]
    assert meta["recipe"] == "labelled" and meta["best_dev"] > meta["history"][0][1]
    results = json.loads((pair / "results.json").read_text())
    assert results["test"]["ndcg@10"] > results["frozen_test"]["ndcg@10"]


@pytest.fixture(scope="module")
def served():  # noqa: ANN201
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from promcse.serving.app import Limits, ServeOptions, create_app
    from promcse.serving.batching import EngineConfig
    from promcse.serving.launch import BackgroundServer
    from promcse.serving.registry import PromptRegistry

    registry = PromptRegistry(device="cpu")
    registry.add("minilm", "minilm")
    for name, path in PAIRS.items():
        registry.add(name, path)
    app = create_app(registry, {}, Limits(), ServeOptions(engine=EngineConfig(max_wait_ms=30)))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield registry, client, server


def test_frozen_and_both_domain_prompts_and_roles_share_batches(served) -> None:  # noqa: ANN001
    registry, client, server = served
    assert len(registry.backbones) == 1, "the frozen model and both pairs share one backbone"
    calls = [(m, t) for m in ("minilm", "scifact", "nfcorpus") for t in ("query", "document")] * 3

    def call(i: int) -> tuple[int, np.ndarray]:
        model, role = calls[i]
        r = client.post("/embed", json={"texts": TEXTS[i % 3 : i % 3 + 2], "model": model, "input_type": role})
        assert r.status_code == 200, r.text
        return i, np.asarray(r.json()["embeddings"])

    engine = server.server.config.app.state.context.engine
    before = engine.stats.batches
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(call, range(len(calls))))
    assert engine.stats.batches - before < len(calls), "requests were not batched together"
    frozen = load("minilm", device="cpu")
    pairs = {name: load(str(path), device="cpu") for name, path in PAIRS.items()}
    for i, got in results:
        model, role = calls[i]
        texts = TEXTS[i % 3 : i % 3 + 2]
        want = frozen.encode(texts) if model == "minilm" else pairs[model].encode(texts, role=role)
        assert np.abs(got - want).max() <= 1e-5, (model, role)
        if role == "document":  # query-only pairs: documents are the frozen backbone's, the index stays valid
            assert np.abs(got - frozen.encode(texts)).max() <= 1e-5
    assert not np.allclose(pairs["scifact"].encode_query(TEXTS), frozen.encode(TEXTS), atol=1e-3)
