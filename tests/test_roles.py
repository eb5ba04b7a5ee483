"""Query and document roles over one backbone: role pairs on disk, loading, evaluation and serving."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import make_prompt_checkpoint, make_sentences
from promcse.errors import PromcseError
from promcse.models.loading import kind_of, load
from promcse.models.roles import RoleEncoder, read_roles, save_roles
from test_retrieval import TINY_DOCS, TINY_QRELS, TINY_QUERIES, write_beir

TEXTS = make_sentences(24, seed=5)


@pytest.fixture(scope="module")
def ckpts(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("roles")
    return {"q": make_prompt_checkpoint(tiny_bert, root / "q", seed=3, length=5),
            "d": make_prompt_checkpoint(tiny_bert, root / "d", seed=4, length=7, pooler="cls", head="always"),
            "plain": make_prompt_checkpoint(tiny_bert, root / "plain", seed=6, length=3)}


def test_role_pair_round_trip_shares_one_backbone(ckpts: dict[str, Path], tmp_path: Path) -> None:
    pair_dir = save_roles(tmp_path / "pair", query=ckpts["q"], document=ckpts["d"])
    meta = json.loads((pair_dir / "roles.json").read_text())
    assert meta == {"format": "promcse-roles", "format_version": 1, "query": "query", "document": "document"}
    assert kind_of(str(pair_dir)) == "roles"
    pair = load(pair_dir, device="cpu")
    assert isinstance(pair, RoleEncoder) and pair.query.backbone is pair.document.backbone
    q, d = load(ckpts["q"], device="cpu"), load(ckpts["d"], device="cpu")
    np.testing.assert_array_equal(pair.encode_query(TEXTS), q.encode(TEXTS))
    np.testing.assert_array_equal(pair.encode_document(TEXTS), d.encode(TEXTS))
    np.testing.assert_array_equal(pair.encode(TEXTS, role="query"), q.encode(TEXTS))
    np.testing.assert_array_equal(pair.encode(TEXTS), d.encode(TEXTS))  # default role: document
    assert pair.dim == q.dim and pair.max_length == min(q.max_length, d.max_length) and pair.tokenizer is not None
    assert pair.similarity(TEXTS[:2], TEXTS[2:5]).shape == (2, 3)
    with pytest.raises(PromcseError, match="unknown role") as err:
        pair.encode(TEXTS, role="passage")
    assert err.value.key == "role"
    np.testing.assert_array_equal(q.encode_query(TEXTS), q.encode_document(TEXTS))  # plain encoders: one role API
    # Rewriting a pair replaces it; a directory holding other files is refused.
    save_roles(pair_dir, query=ckpts["q"])
    assert read_roles(pair_dir)["document"] is None and not (pair_dir / "document").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PromcseError, match="notes.txt"):
        save_roles(tmp_path / "busy", query=ckpts["q"])
    with pytest.raises(PromcseError, match="at least one role"):
        save_roles(tmp_path / "none")
    with pytest.raises(PromcseError, match="onnx|torch") as err:
        load(pair_dir, backend="onnx")
    assert err.value.key == "backend"


def test_query_only_pair_is_the_prompt_for_queries_and_the_frozen_backbone_for_documents(
        tiny_bert: Path, ckpts: dict[str, Path], tmp_path: Path) -> None:
    pair = load(save_roles(tmp_path / "pair", query=ckpts["q"]), device="cpu")
    assert pair.document.prompt is None and pair.document.backbone is pair.query.backbone
    np.testing.assert_array_equal(pair.encode_query(TEXTS), load(ckpts["q"], device="cpu").encode(TEXTS))
    np.testing.assert_array_equal(pair.encode_document(TEXTS), load(str(tiny_bert), device="cpu").encode(TEXTS))
    doc_only = load(save_roles(tmp_path / "doc", document=ckpts["d"]), device="cpu")
    np.testing.assert_array_equal(doc_only.encode_query(TEXTS), load(str(tiny_bert), device="cpu").encode(TEXTS))


def write_pair(folder: Path, ckpt: Path, **fields: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "query").exists():
        import shutil

        shutil.copytree(ckpt, folder / "query")
    meta = {"format": "promcse-roles", "format_version": 1, "query": "query", "document": None, **fields}
    (folder / "roles.json").write_text(json.dumps({k: v for k, v in meta.items() if v != "DROP"}))
    return folder


@pytest.mark.parametrize("fields, key, match", [
    ({"extra": 1}, "extra", "unknown key"),
    ({"document": "DROP"}, "document", "missing key"),
    ({"query": 3}, "query", "relative path or null"),
    ({"query": ""}, "query", "relative path or null"),
    ({"query": "../elsewhere"}, "query", "leaves"),
    ({"query": "/tmp"}, "query", "leaves"),
    ({"query": "."}, "query", "leaves"),
    ({"query": "nothing"}, "query", "not a promcse checkpoint"),
    ({"query": None}, "query", "both roles are null"),
    ({"format_version": "1"}, "format_version", "expected int"),
    ({"format_version": 2}, None, "newer promcse"),
])
def test_roles_json_is_read_strictly(ckpts: dict[str, Path], tmp_path: Path, fields: dict[str, object],
                                     key: str | None, match: str) -> None:
    folder = write_pair(tmp_path / "pair", ckpts["q"], **fields)
    with pytest.raises(PromcseError, match=match) as err:
        load(folder, device="cpu")
    assert err.value.key == key and Path(str(err.value.path)).name == "roles.json"


def test_roles_must_share_one_backbone(tiny_bert: Path, ckpts: dict[str, Path], tmp_path: Path) -> None:
    from conftest import write_tiny_bert

    other = make_prompt_checkpoint(write_tiny_bert(tmp_path / "other_bert", seed=9), tmp_path / "other")
    with pytest.raises(PromcseError, match="encoder.backbone") as err:
        save_roles(tmp_path / "pair", query=ckpts["q"], document=other)
    assert err.value.key == "document"
    folder = write_pair(tmp_path / "disk", ckpts["q"], document="document")
    import shutil

    shutil.copytree(other, folder / "document")
    with pytest.raises(PromcseError, match="share one backbone") as err:
        load(folder, device="cpu")
    assert err.value.key == "document" and Path(str(err.value.path)).name == "roles.json"
    full = make_prompt_checkpoint(tiny_bert, tmp_path / "full", mode="full", length=0)
    with pytest.raises(PromcseError, match="full fine-tune") as err:
        save_roles(tmp_path / "fullpair", query=full)
    assert err.value.key == "query"
    with pytest.raises(PromcseError, match="not a promcse checkpoint") as err:
        save_roles(tmp_path / "bad", document=tmp_path)
    assert err.value.key == "document"


def test_eval_uses_the_roles_and_shares_the_frozen_backbones_cache(tiny_bert: Path, ckpts: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from promcse.evaluation.retrieval import evaluate_encoder

    folder, cache = write_beir(tmp_path / "tiny", TINY_DOCS, TINY_QUERIES, TINY_QRELS), tmp_path / "cache"
    pair = load(save_roles(tmp_path / "pair", query=ckpts["q"]), device="cpu")
    frozen = load(str(tiny_bert), device="cpu")
    base = evaluate_encoder(frozen, folder, cache=cache, show_progress=False)
    roles = evaluate_encoder(pair, folder, cache=cache, show_progress=False)
    assert (base["cache"], roles["cache"]) == ("miss", "hit")
    explicit = evaluate_encoder(load(ckpts["q"], device="cpu"), folder, documents=frozen, cache=False,
                                show_progress=False)
    assert roles["per_query"] == explicit["per_query"]


def test_cli_eval_of_a_role_pair(tiny_bert: Path, ckpts: dict[str, Path], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from promcse.cli import main

    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_beir(tmp_path / "tiny", TINY_DOCS, TINY_QUERIES, TINY_QRELS)
    pair_dir = save_roles(tmp_path / "pair", query=ckpts["q"])
    out = tmp_path / "pair.json"
    assert main(["eval", "--model", str(tiny_bert), "--retrieval", str(folder), "--no-progress"]) == 0
    assert main(["eval", "--model", str(pair_dir), "--retrieval", str(folder), "--json", str(out),
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["retrieval"]["tiny:test"]["cache"] == "hit"


@pytest.fixture(scope="module")
def served(tiny_bert: Path, ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from promcse.serving.app import Limits, ServeOptions, create_app
    from promcse.serving.batching import EngineConfig
    from promcse.serving.launch import BackgroundServer
    from promcse.serving.registry import PromptRegistry

    root = tmp_path_factory.mktemp("served")
    registry = PromptRegistry(device="cpu")
    registry.add("pair", save_roles(root / "pair", query=ckpts["q"], document=ckpts["d"]))
    registry.add("qonly", save_roles(root / "qonly", query=ckpts["q"]))
    registry.add("plain", ckpts["plain"])
    registry.add("bare", str(tiny_bert))
    app = create_app(registry, {}, Limits(), ServeOptions(engine=EngineConfig(max_wait_ms=20)))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield registry, client, server


def test_registry_lists_a_pair_once_and_maps_input_types(served, tiny_bert: Path) -> None:  # noqa: ANN001
    registry, client, _ = served
    assert registry.names == ["pair", "qonly", "plain", "bare"] and len(registry) == 4
    assert len(registry.backbones) == 1, "every role and prompt shares the one backbone"
    assert registry.entry("pair", "query") == "pair#query" and registry.entry("pair") == "pair#document"
    assert registry.entry("plain", "query") == "plain"
    assert registry.get("pair") is registry.roles("pair").document and registry.roles("plain") is None
    with pytest.raises(PromcseError, match="input_type") as err:
        registry.entry("pair", "passage")
    assert err.value.key == "input_type"
    with pytest.raises(PromcseError, match="'#'"):
        registry.add("a#b", str(tiny_bert))
    info = client.get("/models").json()
    listed = [m["name"] for m in info["models"]]
    assert listed == ["pair", "qonly", "plain", "bare"]
    pair = info["models"][0]
    assert pair["roles"]["query"]["prompt_length"] == 5 and pair["roles"]["document"]["prompt_length"] == 7
    assert pair["default_input_type"] == "document"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == listed


def test_mixed_roles_and_prompts_share_batches_and_get_their_own_vectors(served) -> None:  # noqa: ANN001
    registry, client, server = served
    models = ["pair", "qonly", "plain", "bare"]
    types = ["query", "document", None]

    def call(i: int) -> tuple[int, list[list[float]]]:
        texts = TEXTS[i % 20 : i % 20 + 1 + i % 3]
        body = {"texts": texts, "model": models[i % 4], "normalize": False}
        if types[i % 3] is not None:
            body["input_type"] = types[i % 3]
        r = client.post("/embed", json=body)
        assert r.status_code == 200, r.text
        return i, r.json()["embeddings"]

    engine = server.server.config.app.state.context.engine
    before = (engine.stats.rows, engine.stats.batches)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(36)))
    rows, batches = engine.stats.rows - before[0], engine.stats.batches - before[1]
    loaded = {name: registry.roles(name) or registry.get(name) for name in models}
    for i, vectors in results:
        texts, model, role = TEXTS[i % 20 : i % 20 + 1 + i % 3], loaded[models[i % 4]], types[i % 3] or "document"
        want = model.encode(texts, role=role, normalize=False) if isinstance(model, RoleEncoder) else \
            model.encode(texts, normalize=False)
        assert np.abs(np.asarray(vectors) - want).max() <= 1e-5, (i, models[i % 4], role)
    assert rows == sum(1 + i % 3 for i in range(36)) and batches < 36, "requests were not batched together"
    pair = registry.roles("pair")
    assert not np.allclose(pair.encode_query(TEXTS[:3]), pair.encode_document(TEXTS[:3]))


def test_openai_route_takes_input_type(served) -> None:  # noqa: ANN001
    registry, client, _ = served
    pair = registry.roles("qonly")
    unit = {"normalize_embeddings": True}  # OpenAI-style embeddings are unit vectors
    for input_type, want in (("query", pair.encode_query(TEXTS[:2], **unit)),
                             ("document", pair.encode_document(TEXTS[:2], **unit)), (None, pair.encode_document(TEXTS[:2], **unit))):
        body = {"input": TEXTS[:2], "model": "qonly", **({"input_type": input_type} if input_type else {})}
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        got = np.asarray([row["embedding"] for row in r.json()["data"]])
        assert np.abs(got - want).max() <= 1e-5 and r.json()["model"] == "qonly"
    plain = client.post("/v1/embeddings", json={"input": TEXTS[:1], "model": "plain", "input_type": "query"})
    assert plain.status_code == 200


def test_unknown_input_type_is_refused_in_each_routes_shape(served) -> None:  # noqa: ANN001
    _, client, _ = served
    v1 = client.post("/v1/embeddings", json={"input": "a dog", "model": "pair", "input_type": "passage"})
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "input_type"
    assert set(v1.json()["error"]) == {"message", "type", "param", "code"}
    ours = client.post("/embed", json={"texts": ["a dog"], "model": "pair", "input_type": 1})
    assert ours.status_code == 422 and ours.json()["error"]["status"] == 422
    assert any("input_type" in d["loc"] for d in ours.json()["error"]["detail"])


def test_cli_pair_writes_a_query_only_pair(tiny_bert: Path, ckpts: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from promcse.cli import main

    out = tmp_path / "qpair"
    assert main(["pair", "--query", str(ckpts["q"]), "--output", str(out)]) == 0
    assert "document: the frozen backbone" in capsys.readouterr().out
    assert json.loads((out / "roles.json").read_text(encoding="utf-8"))["document"] is None
    encoder = load(str(out), device="cpu")
    assert isinstance(encoder, RoleEncoder)
    texts = ["a dog runs", "the cat sleeps"]
    frozen = load(str(tiny_bert), device="cpu")
    assert np.array_equal(encoder.encode_document(texts), frozen.encode(texts))
    assert main(["pair", "--output", str(tmp_path / "none")]) == 2  # no role given
    assert "--query" in capsys.readouterr().err


def test_similarity_takes_each_sides_input_type(served) -> None:  # noqa: ANN001
    registry, client, _ = served
    a, b = TEXTS[:2], TEXTS[2:5]
    r = client.post("/similarity", json={"a": a, "b": b, "model": "pair", "input_type_a": "query"})
    assert r.status_code == 200, r.text
    pair = registry.roles("pair")
    assert np.abs(np.asarray(r.json()["scores"]) - pair.similarity(a, b)).max() <= 1e-5
    plain = client.post("/similarity", json={"a": a, "b": b, "model": "pair"}).json()["scores"]
    docs = pair.encode_document(a + b, normalize=False)
    from promcse.encoder.encode import cosine_matrix

    assert np.abs(np.asarray(plain) - cosine_matrix(docs[:2], docs[2:])).max() <= 1e-5
    bad = client.post("/similarity", json={"a": a, "b": b, "model": "pair", "input_type_b": "passage"})
    assert bad.status_code == 422
