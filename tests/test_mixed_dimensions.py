"""Rows of one batch from models of different output dimensions (issue: reliability, second round, part 1).

Before the fix, the registry's mixed forward wrote every row into one (N, D) array shaped by the first model,
and concurrent /v1/embeddings requests over a 32-dim and a 48-dim model failed with 500s ("shape mismatch").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import make_prompt_checkpoint, make_sentences, write_tiny_bert
from promcse.encoder.multiprompt import encode_mixed
from promcse.errors import PromcseError
from promcse.serving.registry import PromptRegistry

TEXTS = make_sentences(40, seed=31)


@pytest.fixture(scope="module")
def registry(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptRegistry:
    """Two backbones of different widths (32 and 48), each with a prompt, plus each bare backbone."""
    root = tmp_path_factory.mktemp("dims")
    wide = write_tiny_bert(root / "wide_bert", hidden=48, heads=4, seed=5)
    reg = PromptRegistry(device="cpu")
    reg.add("narrow-p", make_prompt_checkpoint(tiny_bert, root / "narrow-p", seed=1, length=5))
    reg.add("wide-p", make_prompt_checkpoint(wide, root / "wide-p", seed=2, length=7, pooler="cls", head="always"))
    reg.add("narrow", str(tiny_bert))
    reg.add("wide", str(wide))
    return reg


def test_rows_of_models_of_different_dimensions_each_equal_their_own_encode(registry: PromptRegistry) -> None:
    assert sorted({registry.get(n).dim for n in registry.names}) == [32, 48]
    names = [registry.names[(i * 3) % len(registry.names)] for i in range(len(TEXTS))]
    got = registry.encode_rows(TEXTS, names, batch_size=6)
    assert len(got) == len(TEXTS)
    for name in registry.names:
        rows = [i for i, n in enumerate(names) if n == name]
        want = registry.get(name).encode([TEXTS[i] for i in rows], normalize=False)
        assert np.abs(np.stack([got[i] for i in rows]) - want).max() <= 1e-5, name


def test_encode_mixed_refuses_mixed_dimensions_clearly(registry: PromptRegistry) -> None:
    with pytest.raises(PromcseError, match=r"different dimensions \[32, 48\]"):
        encode_mixed([registry.get("narrow"), registry.get("wide")], TEXTS[:2])


def test_engine_batches_mixing_dimensions(registry: PromptRegistry) -> None:
    from promcse.serving.batching import BatchEngine, EngineConfig

    engine = BatchEngine(registry, EngineConfig(max_wait_ms=30))
    try:
        jobs = [(i, engine.submit(TEXTS[i : i + 1 + i % 3], registry.names[i % 4])) for i in range(24)]
        for i, job in jobs:
            want = registry.get(registry.names[i % 4]).encode(TEXTS[i : i + 1 + i % 3], normalize=False)
            assert np.abs(job.future.result(timeout=60) - want).max() <= 1e-5
        assert engine.stats.batches < 24  # jobs of both widths really shared batches
    finally:
        engine.close()


@pytest.mark.parametrize("dimensions", [None, 16])
def test_openai_requests_over_models_of_different_dimensions(registry: PromptRegistry, dimensions: int | None) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from promcse.serving.app import Limits, ServeOptions, create_app
    from promcse.serving.batching import EngineConfig
    from promcse.serving.launch import BackgroundServer

    app = create_app(registry, {}, Limits(), ServeOptions(engine=EngineConfig(max_wait_ms=20)))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        def call(i: int) -> tuple[int, int, list[list[float]]]:
            body = {"input": TEXTS[i % 30 : i % 30 + 1 + i % 3], "model": registry.names[i % 4]}
            if dimensions is not None:
                body["dimensions"] = dimensions
            r = client.post("/v1/embeddings", json=body)
            return i, r.status_code, [d["embedding"] for d in r.json().get("data", [])] if r.status_code == 200 else r.text

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(36)))
    assert [code for _, code, _ in results] == [200] * 36, [r for r in results if r[1] != 200][:2]
    for i, _, vectors in results:
        want = registry.get(registry.names[i % 4]).encode(TEXTS[i % 30 : i % 30 + 1 + i % 3], normalize=False)
        if dimensions is not None:
            want = want[:, :dimensions]
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
        assert np.abs(np.asarray(vectors) - want).max() <= 1e-5
