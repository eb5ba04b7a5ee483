"""``promcse serve --backend onnx``: the engine's rows through one open-bank ONNX graph per backbone, prompts fed as
inputs: listed models, store prompts and a prompt hot-added while serving all equal their torch vectors; rows the
graph cannot hold (an MLP head at inference) still run on torch, in the same request stream."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

import promcse
from conftest import make_prompt_checkpoint, make_sentences

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from promcse.errors import PromcseError  # noqa: E402
from promcse.serving.app import Limits, ServeOptions, create_app  # noqa: E402
from promcse.serving.batching import EngineConfig  # noqa: E402
from promcse.serving.launch import BackgroundServer, load_server  # noqa: E402

TEXTS = make_sentences(6, seed=17)


@pytest.fixture(scope="module")
def setup(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory, ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_onnx")
    store = root / "store"
    store.mkdir()
    return {"a": make_prompt_checkpoint(tiny_bert, root / "a", length=3, shift_positions=False),
            "b": make_prompt_checkpoint(tiny_bert, store / "b", length=6, shift_positions=True, seed=4),
            "head": make_prompt_checkpoint(tiny_bert, root / "head", length=3, pooler="cls", head="always", seed=6),
            "new": make_prompt_checkpoint(tiny_bert, root / "new", length=9, shift_positions=False, seed=8),
            "store": store, "cache": root / "cache"}


def unit(folder: Path) -> np.ndarray:
    return promcse.load(str(folder), device="cpu").encode(TEXTS, normalize_embeddings=True)


@pytest.mark.parametrize("quantize, tol", [("none", 1e-5), ("int8", None)])
def test_every_kind_of_prompt_runs_on_the_onnx_backend(setup: dict, monkeypatch: pytest.MonkeyPatch,
                                                        quantize: str, tol: float | None) -> None:
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(setup["cache"]))
    registry, _ = load_server({"a": str(setup["a"]), "head": str(setup["head"])}, device="cpu", backend="onnx",
                              quantize=quantize)
    options = ServeOptions(engine=EngineConfig(max_wait_ms=1), prompts_dir=str(setup["store"]),
                           allow_admin_without_keys=True)
    app = create_app(registry, {}, Limits(), options)
    files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in setup["new"].iterdir() if p.is_file()}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.put("/v1/prompts/new", json={"files": files}).status_code in (200, 201)
        for name, folder in (("a", "a"), ("b", "b"), ("new", "new"), ("head", "head")):
            r = client.post("/v1/embeddings", json={"input": TEXTS, "model": name})
            assert r.status_code == 200, r.text
            got = np.asarray([row["embedding"] for row in r.json()["data"]])
            want = unit(setup[folder])
            if tol is not None or name == "head":  # the head's rows run on torch: exact either way
                assert np.abs(got - want).max() <= 1e-5, name
            else:
                assert (got * want).sum(1).min() >= 0.98, name  # int8: cosine to the fp32 torch vectors
                assert np.abs(got - want).max() > 1e-6, name  # and it did run the int8 graph
    assert any(p.name.startswith("bank-") for p in (setup["cache"] / "onnx").iterdir())
    sessions = [graph.session for graph in registry.onnx._graphs.values()]
    assert sessions and all(s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
                            == "0" for s in sessions)  # the server's graph threads leave the cores when idle


def test_the_onnx_backend_refuses_what_it_cannot_do(setup: dict) -> None:
    with pytest.raises(PromcseError) as err:
        load_server({"a": str(setup["a"])}, device="cpu", backend="torch", quantize="int8")
    assert err.value.key == "quantize"
    with pytest.raises(PromcseError) as err:
        load_server({"a": str(setup["a"])}, device="cuda", backend="onnx")
    assert err.value.key == "device"


def test_texts_over_the_token_limit_get_413_unless_truncate(setup: dict) -> None:
    """TEI's ``truncate``: refused by default (never a silently shortened vector), cut when asked, on both routes."""
    registry, _ = load_server({"a": str(setup["a"])}, device="cpu")
    long_text = " ".join(make_sentences(40, seed=2))[:1900]  # under the character limit, far over 64 positions
    app = create_app(registry, {}, Limits(), ServeOptions(engine=EngineConfig(max_wait_ms=1)))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for route, body in (("/v1/embeddings", {"input": ["short text", long_text], "model": "a"}),
                            ("/embed", {"texts": ["short text", long_text], "model": "a"})):
            r = client.post(route, json=body)
            assert r.status_code == 413 and "[1]' is" in r.text and "truncate" in r.text, r.text
            r = client.post(route, json={**body, "truncate": True})
            assert r.status_code == 200, r.text
        r = client.post("/v1/embeddings", json={"input": ["x" * 5000], "model": "a"})
        assert r.status_code == 413
        r = client.post("/v1/embeddings", json={"input": ["word " * 1000], "model": "a", "truncate": True})
        assert r.status_code == 200
    with pytest.warns(UserWarning):  # the cut vector is the model's own encode, cut at its token limit
        want = promcse.load(str(setup["a"]), device="cpu").encode([long_text], normalize_embeddings=True)
    with BackgroundServer(create_app(registry, {}, Limits(), ServeOptions())) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/embeddings", json={"input": [long_text], "model": "a", "truncate": True})
    assert np.abs(np.asarray(r.json()["data"][0]["embedding"]) - want[0]).max() <= 1e-5


def test_processes_starting_together_export_a_graph_once(setup: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers (here: two OnnxRows, as Ray replicas or uvicorn workers would hold) opening the same graph at once:
    one exports under the lock file, the other waits and opens that export."""
    import threading

    import promcse.serving.onnx_rows as onnx_rows

    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))
    exports: list[int] = []
    real_export = onnx_rows.export_bank_graph

    def slow_export(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        exports.append(threading.get_ident())
        threading.Event().wait(0.5)  # long enough for the other thread to arrive meanwhile
        return real_export(*args, **kwargs)

    monkeypatch.setattr(onnx_rows, "export_bank_graph", slow_export)
    encoder = promcse.load(str(setup["a"]), device="cpu")
    graphs: list[object] = []
    threads = [threading.Thread(target=lambda: graphs.append(onnx_rows.OnnxRows().graph_for(encoder)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(graphs) == 2 and len(exports) == 1
    rows = onnx_rows.OnnxRows().encode(TEXTS, [encoder] * len(TEXTS))
    assert len(exports) == 1 and np.abs(np.stack([rows[i] for i in range(len(TEXTS))])
                                        - encoder.encode(TEXTS)).max() <= 1e-5
