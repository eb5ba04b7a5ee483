"""The prompt store (``promcse serve --prompts DIR``): lazy loads over the shared backbone, an LRU byte budget,
versions in every embeddings response, the admin API (add, replace, remove while serving), replicas over one
folder, and API keys with namespaces (every route, across tenants)."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import promcse
import promcse.cli
from conftest import make_prompt_checkpoint, make_sentences

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from promcse.corpus.search import Index  # noqa: E402
from promcse.models.roles import save_roles  # noqa: E402
from promcse.serving.app import Limits, ServeOptions, create_app  # noqa: E402
from promcse.serving.batching import EngineConfig  # noqa: E402
from promcse.serving.launch import BackgroundServer  # noqa: E402
from promcse.errors import PromcseError  # noqa: E402
from promcse.serving.prompt_files import folder_version  # noqa: E402
from promcse.serving.registry import PromptRegistry  # noqa: E402
from promcse.serving.store import PromptStore  # noqa: E402
from promcse.serving.tenants import read_keys  # noqa: E402

TEXTS = make_sentences(6, seed=41)
HEADER = "X-Promcse-Model-Version"


@pytest.fixture(scope="module")
def ckpts(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three prompt checkpoints over the tiny BERT (a: P=3, b: P=3 + MLP head, c: P=5) and a role pair (a, b)."""
    root = tmp_path_factory.mktemp("store-src")
    out = {"a": make_prompt_checkpoint(tiny_bert, root / "a", seed=1, length=3),
           "b": make_prompt_checkpoint(tiny_bert, root / "b", seed=2, length=3, pooler="cls", head="always"),
           "c": make_prompt_checkpoint(tiny_bert, root / "c", seed=3, length=5)}
    out["pair"] = save_roles(root / "pair", query=out["a"], document=out["b"])
    return out


def want(folder: Path, texts: list[str] = TEXTS, role: str | None = None) -> np.ndarray:
    """What the server must answer: the checkpoint's own unit vectors."""
    model = promcse.load(folder, device="cpu")
    if role is not None:
        return model.encode(texts, role=role, normalize_embeddings=True)
    return model.encode(texts, normalize_embeddings=True)


def files_of(folder: Path) -> dict[str, str]:
    """A checkpoint folder as a PUT body's ``files``."""
    return {p.relative_to(folder).as_posix(): base64.b64encode(p.read_bytes()).decode()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_store(root: Path, prompts: dict[str, Path]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, folder in prompts.items():
        shutil.copytree(folder, root / name)
    return root


@contextmanager
def serving(store: Path | None, registry: PromptRegistry | None = None, indexes: dict | None = None,
            **options: Any) -> Iterator[tuple[Any, Any]]:
    """(httpx client, app context) of a live server over the store folder."""
    options = {"engine": EngineConfig(max_wait_ms=1), "prompts_dir": None if store is None else str(store), **options}
    registry = registry if registry is not None else PromptRegistry(device="cpu")  # an empty one is falsy
    app = create_app(registry, indexes or {}, Limits(), ServeOptions(**options))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, app.state.context


def embed(client: Any, model: str, key: str | None = None, texts: list[str] = TEXTS, **extra: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/embeddings", json={"input": texts, "model": model, **extra}, headers=headers)


def vectors(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]])


def close(got: np.ndarray, expected: np.ndarray) -> bool:
    return got.shape == expected.shape and float(np.abs(got - expected).max()) <= 1e-5


def test_prompts_load_on_first_request_over_one_shared_backbone(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {"alpha": ckpts["a"], "beta": ckpts["b"], "pair": ckpts["pair"]})
    (store / "notes").mkdir()  # no model's file in it: not a prompt
    (store / "broken").mkdir()
    (store / "broken" / "config.json").write_text("{")  # looks like one: listed, and 503 when used
    registry = PromptRegistry(device="cpu")
    with serving(store, registry) as (client, ctx):
        assert ctx.store.loaded() == [] and registry.backbones == {}  # nothing loaded at start
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed == ["alpha", "beta", "broken", "pair"]
        assert ctx.store.loaded() == []  # listing loads nothing
        r = embed(client, "alpha")
        assert close(vectors(r), want(ckpts["a"]))
        version = folder_version(store / "alpha")
        assert r.json()["model_version"] == version == r.headers[HEADER] and version.startswith("sha256:")
        assert ctx.store.loaded() == ["alpha"]
        native = client.post("/embed", json={"texts": TEXTS, "model": "beta"})
        assert native.status_code == 200 and native.headers[HEADER] == native.json()["model_version"]
        assert native.json()["model_version"] == folder_version(store / "beta")
        assert close(np.array(native.json()["embeddings"]), want(ckpts["b"]))
        for role, source in (("query", "a"), ("document", "b")):
            assert close(vectors(embed(client, "pair", input_type=role)), want(ckpts[source]))
        assert len(registry.backbones) == 1  # three prompts, one backbone copy
        broken = embed(client, "broken")
        assert broken.status_code == 503 and "'broken'" in broken.json()["error"]["message"]
        assert embed(client, "notes").status_code == 404
        prompts = {p["name"]: p for p in client.get("/v1/prompts").json()["data"]}
        assert prompts["alpha"]["loaded"] and prompts["alpha"]["bytes"] == 3 * 2 * 2 * 32 * 4
        assert prompts["alpha"]["version"] == version and not prompts["broken"]["loaded"]
        assert sorted(prompts) == ["alpha", "beta", "broken", "pair"] and prompts["broken"]["bytes"] is None


def test_listing_pages_hash_only_their_own_prompts(ckpts: dict[str, Path], tmp_path: Path) -> None:
    names = ["alpha", "beta", "delta", "gamma", "pair"]
    store = make_store(tmp_path / "store", {n: ckpts["pair" if n == "pair" else "a"] for n in names})
    with serving(store) as (client, ctx):
        first = client.get("/v1/prompts", params={"limit": 2}).json()
        assert [p["name"] for p in first["data"]] == ["alpha", "beta"] and first["has_more"]
        assert first["last_id"] == "beta" and sorted(ctx.store._versions) == ["alpha", "beta"]  # nothing else hashed
        second = client.get("/v1/prompts", params={"limit": 2, "after": first["last_id"]}).json()
        assert [p["name"] for p in second["data"]] == ["delta", "gamma"] and second["has_more"]
        last = client.get("/v1/prompts", params={"limit": 2, "after": second["last_id"]}).json()
        assert [p["name"] for p in last["data"]] == ["pair"] and not last["has_more"] and last["last_id"] == "pair"
        assert client.get("/v1/prompts", params={"after": "pair"}).json() == {
            "object": "list", "data": [], "has_more": False, "last_id": None}
        assert client.get("/v1/prompts", params={"after": "c"}).json()["last_id"] == "pair"  # any string, all after
        everything = client.get("/v1/prompts").json()
        assert [p["name"] for p in everything["data"]] == names and not everything["has_more"]
        assert everything["data"][0]["version"] == folder_version(store / "alpha")
        for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": "ten"}):
            r = client.get("/v1/prompts", params=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "limit", (bad, r.text)


def test_lru_eviction_under_a_tiny_budget(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {"alpha": ckpts["a"], "gamma": ckpts["c"], "beta": ckpts["b"]})
    one = 3 * 2 * 2 * 32 * 4  # alpha's prompt: P x layers x (key, value) x hidden float32; gamma is 5/3 of it
    with serving(store, prompt_cache_mb=(one * 2) / 2 ** 20) as (client, ctx):
        assert close(vectors(embed(client, "alpha")), want(ckpts["a"]))
        held = ctx.store.acquire("alpha")  # what an in-flight batch holds
        assert close(vectors(embed(client, "gamma")), want(ckpts["c"]))
        assert ctx.store.loaded() == ["gamma"] and ctx.store.evictions == 1  # alpha (least recent) evicted
        assert ctx.store.cached_bytes <= one * 2
        # an evicted prompt still encodes for whoever holds it, through the engine's mixed forward
        rows = ctx.registry.encode_rows(TEXTS, [held.model] * len(TEXTS))
        raw = promcse.load(ckpts["a"], device="cpu").encode(TEXTS)
        assert float(np.abs(np.stack(rows) - raw).max()) <= 1e-5
        loads = ctx.store.loads
        assert close(vectors(embed(client, "alpha")), want(ckpts["a"]))  # reloaded, same vectors
        assert ctx.store.loads == loads + 1 and ctx.store.loaded() == ["alpha"]
        assert close(vectors(embed(client, "beta")), want(ckpts["b"]))  # head: over the budget alone
        assert ctx.store.cached_bytes <= one * 2
        scraped = metric_values(client.get("/metrics").text)
        assert scraped["promcse_prompt_loads_total"] == ctx.store.loads == loads + 2
        assert scraped["promcse_prompt_evictions_total"] == ctx.store.evictions >= 3
        assert scraped["promcse_prompt_cache_bytes"] == ctx.store.cached_bytes
        assert scraped["promcse_prompt_cache_prompts"] == len(ctx.store.loaded())
        assert scraped["promcse_prompt_cache_budget_bytes"] == int(one * 2)


def metric_values(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus exposition text, by name."""
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def test_unknown_prompt_is_404_naming_it(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {"alpha": ckpts["a"]})
    with serving(store) as (client, ctx):
        for name in ("nope", "../alpha", ".alpha", "alpha/", "a" * 65):
            r = embed(client, name)
            assert r.status_code == 404, (name, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and repr(name) in error["message"]
            assert error["param"] == "model" and error["code"] == "model_not_found"
        assert client.post("/embed", json={"texts": TEXTS, "model": "nope"}).status_code == 404
        assert client.post("/similarity", json={"a": TEXTS, "b": TEXTS, "model": "nope"}).status_code == 404
        assert ctx.store.loaded() == []


def test_an_upload_may_not_make_the_server_load_a_backbone(ckpts: dict[str, Path], tmp_path: Path,
                                                           tiny_bert: Path) -> None:
    store = make_store(tmp_path / "store", {"alpha": ckpts["a"]})
    registry = PromptRegistry(device="cpu")
    with serving(store, registry, allow_admin_without_keys=True) as (client, ctx):
        refused = client.put("/v1/prompts/gamma", json={"files": files_of(ckpts["c"])})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "files"
        assert f"backbone '{tiny_bert}' is not loaded on this server" in refused.json()["error"]["message"]
        assert registry.backbones == {} and not (store / "gamma").exists()
        assert embed(client, "alpha").status_code == 200  # an operator's folder may load its backbone...
        assert client.put("/v1/prompts/gamma", json={"files": files_of(ckpts["c"])}).status_code == 201  # ...then
    registry = PromptRegistry(device="cpu")
    with serving(store, registry, allow_admin_without_keys=True, store_backbones=(str(tiny_bert),)) as (client, _):
        assert len(registry.backbones) == 1  # loaded at start
        assert client.put("/v1/prompts/delta", json={"files": files_of(ckpts["c"])}).status_code == 201
    with pytest.raises(PromcseError, match="does-not-exist"):  # a bad --store-backbone fails at start, naming it
        PromptRegistry(device="cpu").hold_backbone(str(tmp_path / "does-not-exist"))


def test_put_adds_replaces_and_delete_removes(ckpts: dict[str, Path], tmp_path: Path, tiny_bert: Path) -> None:
    store = make_store(tmp_path / "store", {})
    with serving(store, allow_admin_without_keys=True, store_backbones=(str(tiny_bert),)) as (client, ctx):
        added = client.put("/v1/prompts/gamma", json={"files": files_of(ckpts["c"])})
        assert added.status_code == 201, added.text
        v1 = folder_version(ckpts["c"])  # the same files: the same version
        assert added.json()["version"] == v1 == added.headers[HEADER] and not added.json()["replaced"]
        r = embed(client, "gamma")
        assert close(vectors(r), want(ckpts["c"])) and r.headers[HEADER] == v1 == r.json()["model_version"]
        replaced = client.put("/v1/prompts/gamma", json={"files": files_of(ckpts["a"])})
        assert replaced.status_code == 200 and replaced.json()["replaced"]
        v2 = folder_version(ckpts["a"])
        r = embed(client, "gamma")
        assert v2 != v1 and r.headers[HEADER] == v2 == r.json()["model_version"]
        assert close(vectors(r), want(ckpts["a"]))
        assert client.post("/embed", json={"texts": TEXTS, "model": "gamma"}).headers[HEADER] == v2
        assert [p["name"] for p in client.get("/v1/prompts").json()["data"]] == ["gamma"]
        assert client.delete("/v1/prompts/gamma").status_code == 200
        gone = embed(client, "gamma")
        assert gone.status_code == 404 and "'gamma'" in gone.json()["error"]["message"]
        assert client.delete("/v1/prompts/gamma").status_code == 404
        assert client.get("/v1/prompts").json()["data"] == [] and ctx.store.loaded() == []
        assert sorted(p.name for p in store.iterdir()) == [".promcse.lock"]  # no temporary folder left


def broken_uploads(ckpts: dict[str, Path]) -> dict[str, dict[str, str]]:
    bad_json = files_of(ckpts["c"])
    bad_json["config.json"] = base64.b64encode(b'{"format": "promcse-checkpoint", "encoder": ').decode()
    shapes = files_of(ckpts["c"])  # P=5 config with P=3 weights
    shapes["prompt.safetensors"] = files_of(ckpts["a"])["prompt.safetensors"]
    shapes.pop("canary.json", None)  # the shapes, not the canary vectors, must refuse it
    head = files_of(ckpts["a"])  # weights without the head the config asks for
    head["config.json"] = files_of(ckpts["b"])["config.json"]
    head.pop("canary.json", None)
    nan = files_of(ckpts["a"])
    return {"bad json": bad_json, "wrong shapes": shapes, "missing head": head,
            "not a model": {"README.md": base64.b64encode(b"hello").decode()},
            "no config": {k: v for k, v in nan.items() if k != "config.json"}}


def test_a_broken_upload_is_refused_and_the_old_version_keeps_serving(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {"gamma": ckpts["c"]})
    with serving(store, allow_admin_without_keys=True) as (client, ctx):
        v1 = embed(client, "gamma").headers[HEADER]
        for what, files in broken_uploads(ckpts).items():
            r = client.put("/v1/prompts/gamma", json={"files": files})
            assert r.status_code == 422, (what, r.status_code, r.text)
            assert r.json()["error"]["code"] == "invalid_model" and str(store) not in r.text, what
            assert client.put("/v1/prompts/fresh", json={"files": files}).status_code == 422, what
            after = embed(client, "gamma")
            assert after.headers[HEADER] == v1 and close(vectors(after), want(ckpts["c"])), what
        assert folder_version(store / "gamma") == v1 and not (store / "fresh").exists()
        assert sorted(p.name for p in store.iterdir()) == [".promcse.lock", "gamma"]


def test_bad_names_files_and_bodies_are_400(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {})
    good = files_of(ckpts["a"])
    with serving(store, allow_admin_without_keys=True) as (client, _):
        for name in (".hidden", "-dash", "a" * 65, "sp ace", "x%00y"):
            r = client.put(f"/v1/prompts/{name}", json={"files": good})
            assert r.status_code == 400 and r.json()["error"]["param"] == "name", (name, r.text)
        assert client.put("/v1/prompts/a%2Fb", json={"files": good}).status_code == 404  # a path: no route
        for files in ({"../config.json": "e30="}, {".hidden": "e30="}, {"a/b/c/d/e": "e30="}, {}):
            r = client.put("/v1/prompts/ok", json={"files": files})
            assert r.status_code == 400 and r.json()["error"]["param"] == "files", (files, r.text)
        r = client.put("/v1/prompts/ok", json={"files": {"config.json": "not base64!"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "files"
        assert client.put("/v1/prompts/ok", json={"files": good, "extra": 1}).status_code == 400
        assert client.delete("/v1/prompts/.hidden").status_code == 400
        assert sorted(p.name for p in store.iterdir()) == [".promcse.lock"]


def test_admin_routes_are_refused_without_keys_by_default(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {"alpha": ckpts["a"]})
    with serving(store) as (client, _):
        r = client.put("/v1/prompts/beta", json={"files": files_of(ckpts["b"])})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        assert client.delete("/v1/prompts/alpha").status_code == 403
        assert [p["name"] for p in client.get("/v1/prompts").json()["data"]] == ["alpha"]  # reading is fine
    assert sorted(p.name for p in store.iterdir()) == [".promcse.lock", "alpha"]


def test_a_second_replica_over_the_same_folder_sees_every_write(ckpts: dict[str, Path], tmp_path: Path,
                                                                tiny_bert: Path) -> None:
    store = make_store(tmp_path / "store", {})
    with serving(store, allow_admin_without_keys=True, store_backbones=(str(tiny_bert),)) as (writer, _), \
            serving(store) as (replica, _):
        assert embed(replica, "delta").status_code == 404
        assert writer.put("/v1/prompts/delta", json={"files": files_of(ckpts["c"])}).status_code == 201
        r = embed(replica, "delta")
        assert close(vectors(r), want(ckpts["c"])) and r.headers[HEADER] == folder_version(ckpts["c"])
        assert writer.put("/v1/prompts/delta", json={"files": files_of(ckpts["b"])}).status_code == 200
        r = embed(replica, "delta")  # loaded before: the changed folder is noticed and reloaded
        assert close(vectors(r), want(ckpts["b"])) and r.json()["model_version"] == folder_version(ckpts["b"])
        assert "delta" in [m["id"] for m in replica.get("/v1/models").json()["data"]]
        assert writer.delete("/v1/prompts/delta").status_code == 200
        assert embed(replica, "delta").status_code == 404
        assert "delta" not in [m["id"] for m in replica.get("/v1/models").json()["data"]]


def test_a_request_in_flight_finishes_on_the_version_it_started_with(ckpts: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(tmp_path / "store", {"gamma": ckpts["c"]})
    registry = PromptRegistry(device="cpu")
    entered, release = threading.Event(), threading.Event()
    original = registry.encode_rows

    def slow_rows(texts, models, batch_size=64):  # noqa: ANN001, ANN202 - holds the first batch until released
        if not release.is_set():
            entered.set()
            release.wait(30)
        return original(texts, models, batch_size)

    monkeypatch.setattr(registry, "encode_rows", slow_rows)
    with serving(store, registry, allow_admin_without_keys=True) as (client, _):
        out: list[Any] = []
        first = threading.Thread(target=lambda: out.append(embed(client, "gamma")))
        first.start()
        assert entered.wait(30)
        assert client.put("/v1/prompts/gamma", json={"files": files_of(ckpts["a"])}).status_code == 200
        release.set()
        first.join(30)
        assert out[0].headers[HEADER] == folder_version(ckpts["c"]) and close(vectors(out[0]), want(ckpts["c"]))
        after = embed(client, "gamma")
        assert after.headers[HEADER] == folder_version(ckpts["a"]) and close(vectors(after), want(ckpts["a"]))


def test_a_crashed_write_is_cleaned_when_the_store_opens(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {"kept": ckpts["a"]})
    shutil.copytree(ckpts["b"], store / ".alpha.1a2b3c4d.old")  # crashed between the two renames of a replace
    shutil.copytree(ckpts["c"], store / ".alpha.x9y8z7w6.tmp")  # the new version, never swapped in
    shutil.copytree(ckpts["c"], store / ".kept.0f0f0f0f.old")  # crashed after the swap: the old one is stale
    opened = PromptStore(store, PromptRegistry(device="cpu"), budget_bytes=1 << 20)
    assert opened.names() == ["alpha", "kept"]
    assert folder_version(store / "alpha") == folder_version(ckpts["b"])
    assert folder_version(store / "kept") == folder_version(ckpts["a"])
    assert sorted(p.name for p in store.iterdir()) == [".promcse.lock", "alpha", "kept"]


KEYS = {"alice-key": {"prompts": ["alice-*"], "admin": True},
        "bob-key": {"prompts": ["bob-*"]},
        "carol-key": {"prompts": ["bob-*"], "admin": True}}


@pytest.fixture
def tenants(ckpts: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A server with keys: alice (alice-*, admin), bob (bob-*), carol (bob-*, admin) and ops (--api-key: all, not
    admin); start-up model alice-base with index alice-idx; store prompts alice-one and bob-one."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in KEYS.items()) + "\n")
    store = make_store(tmp_path / "store", {"alice-one": ckpts["a"], "bob-one": ckpts["b"]})
    registry = PromptRegistry(device="cpu")
    registry.add("alice-base", ckpts["c"])
    index = Index(str(ckpts["c"]), kind="flat", device="cpu")
    index.add(TEXTS)
    index.save(tmp_path / "idx")
    indexes = {"alice-idx": (Index.load(tmp_path / "idx", encoder=registry.get("alice-base")), "alice-base")}
    with serving(store, registry, indexes, keys=read_keys(keys_file), api_key="ops") as (client, _):
        yield client, store


def call(client: Any, key: str | None, method: str, path: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, path, json=body, headers=headers)


def same_as_missing(client: Any, key: str, method: str, path: str, body: Any, name: str) -> None:
    """The answer for ``name`` (another tenant's) equals the answer for a name that exists nowhere."""
    ghost = name.split("-")[0] + "-ghost"
    seen = call(client, key, method, path.replace("NAME", name), json.loads(json.dumps(body).replace("NAME", name)))
    missing = call(client, key, method, path.replace("NAME", ghost),
                   json.loads(json.dumps(body).replace("NAME", ghost)))
    assert seen.status_code == missing.status_code == 404, (path, seen.text)
    assert seen.text.replace(name, ghost) == missing.text, (path, seen.text, missing.text)


ROUTES = [("POST", "/v1/embeddings", {"input": ["a dog"], "model": "NAME"}),
          ("POST", "/embed", {"texts": ["a dog"], "model": "NAME"}),
          ("POST", "/similarity", {"a": ["a dog"], "b": ["a cat"], "model": "NAME"}),
          ("GET", "/v1/prompts/NAME", None),
          ("DELETE", "/v1/prompts/NAME", None)]


def test_keys_see_and_use_only_their_namespace_on_every_route(tenants: tuple[Any, Path],
                                                              ckpts: dict[str, Path]) -> None:
    client, store = tenants
    for method, path, body in ROUTES[:3]:
        for key, own in (("alice-key", "alice-one"), ("bob-key", "bob-one"), ("ops", "bob-one")):
            mine = call(client, key, method, path, json.loads(json.dumps(body).replace("NAME", own)))
            assert mine.status_code == 200, (key, path, mine.text)
        same_as_missing(client, "bob-key", method, path, body, "alice-one")  # a store prompt
        same_as_missing(client, "bob-key", method, path, body, "alice-base")  # a start-up model
        same_as_missing(client, "alice-key", method, path, body, "bob-one")
    same_as_missing(client, "bob-key", "GET", "/v1/prompts/NAME", None, "alice-one")
    same_as_missing(client, "alice-key", "DELETE", "/v1/prompts/NAME", None, "bob-one")
    assert call(client, "alice-key", "POST", "/search", {"query": "a dog", "index": "alice-idx"}).status_code == 200
    hidden = call(client, "bob-key", "POST", "/search", {"query": "a dog", "index": "alice-idx"})
    ghost = call(client, "bob-key", "POST", "/search", {"query": "a dog", "index": "nothing"})
    assert hidden.status_code == ghost.status_code == 404 and hidden.text.replace("alice-idx", "nothing") == ghost.text
    assert call(client, "bob-key", "POST", "/search", {"query": "a dog"}).status_code == 404  # no default for bob
    assert call(client, "bob-key", "POST", "/embed", {"texts": ["a dog"]}).status_code == 404  # nor a default model
    assert (store / "bob-one").is_dir()


def test_listings_show_only_the_keys_namespace(tenants: tuple[Any, Path]) -> None:
    client, _ = tenants
    ids = lambda key: [m["id"] for m in call(client, key, "GET", "/v1/models").json()["data"]]  # noqa: E731
    assert ids("alice-key") == ["alice-base", "alice-one"] and ids("bob-key") == ["bob-one"]
    assert ids("ops") == ["alice-base", "alice-one", "bob-one"]
    names = lambda key: [p["name"] for p in call(client, key, "GET", "/v1/prompts").json()["data"]]  # noqa: E731
    assert names("alice-key") == ["alice-one"] and names("bob-key") == ["bob-one"]
    info = call(client, "bob-key", "GET", "/models").json()
    assert info["models"] == [] and info["prompts"] == ["bob-one"] and info["indexes"] == []
    assert info["default_model"] is None
    alice = call(client, "alice-key", "GET", "/models").json()
    assert [m["name"] for m in alice["models"]] == ["alice-base"] and alice["indexes"][0]["name"] == "alice-idx"


def test_admin_writes_need_an_admin_key_inside_its_namespace(tenants: tuple[Any, Path],
                                                             ckpts: dict[str, Path]) -> None:
    client, store = tenants
    body = {"files": files_of(ckpts["c"])}
    for key in (None, "wrong-key"):
        assert call(client, key, "PUT", "/v1/prompts/alice-two", body).status_code == 401
        assert call(client, key, "GET", "/v1/models").status_code == 401
    for key in ("bob-key", "ops"):  # not admin: refused whatever the name
        for name in ("bob-two", "alice-two", "bob-one"):
            r = call(client, key, "PUT", f"/v1/prompts/{name}", body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required", (key, name)
        assert call(client, key, "DELETE", "/v1/prompts/bob-one").status_code == 403
    for name in ("bob-one", "bob-new"):  # alice's admin stops at her namespace, existing or not
        r = call(client, "alice-key", "PUT", f"/v1/prompts/{name}", body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "outside_namespace"
        assert "exists" not in r.text
    assert call(client, "alice-key", "PUT", "/v1/prompts/alice-base", body).status_code == 409
    assert call(client, "alice-key", "PUT", "/v1/prompts/alice-two", body).status_code == 201
    assert call(client, "carol-key", "DELETE", "/v1/prompts/bob-one").status_code == 200
    assert call(client, "carol-key", "DELETE", "/v1/prompts/alice-two").status_code == 404
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["alice-one", "alice-two"]
    r = call(client, "alice-key", "POST", "/v1/embeddings", {"input": TEXTS, "model": "alice-two"})
    assert close(vectors(r), want(ckpts["c"]))


def test_keys_files_are_checked(tmp_path: Path) -> None:
    from promcse.errors import PromcseError

    bad = {"list": "[1, 2]", "no prompts": "k1: {admin: true}", "admin text": 'k1: {prompts: ["*"], admin: "yes"}',
           "space in key": '"a b": {prompts: ["*"]}', "extra": 'k1: {prompts: ["*"], role: x}',
           "empty glob": 'k1: {prompts: [""]}', "empty": "{}", "not yaml": "k1: [unclosed"}
    for what, text in bad.items():
        (tmp_path / "k.yaml").write_text(text)
        with pytest.raises(PromcseError) as err:
            read_keys(tmp_path / "k.yaml")
        assert err.value.key == "keys", what
    (tmp_path / "k.json").write_text(json.dumps(KEYS))
    ring = read_keys(tmp_path / "k.json")
    assert len(ring) == 3 and "alice-key" not in repr(ring)
    assert ring.tenant_for(b"Bearer alice-key").admin and ring.tenant_for(b"Bearer bob-key").sees("bob-x")
    assert ring.tenant_for(b"Bearer alice-ke") is None and ring.tenant_for(b"alice-key") is None
    assert ring.tenant_for(b"Bearer ") is None
    from promcse.serving.tenants import key_ring

    assert len(key_ring(ring, "alice-key")) == 3 and key_ring(ring, "alice-key").tenant_for(b"Bearer alice-key").admin
    assert len(key_ring(ring, "ops")) == 4 and not key_ring(ring, "ops").tenant_for(b"Bearer ops").admin
    assert key_ring(None, None) is None


def test_cli_checks_the_store_options(tmp_path: Path) -> None:
    assert promcse.cli.main(["serve"]) == 2  # neither --model nor --prompts
    assert promcse.cli.main(["serve", "--prompts", str(tmp_path / "missing")]) == 2
    (tmp_path / "keys.yaml").write_text("k1: {admin: true}\n")
    assert promcse.cli.main(["serve", "--prompts", str(tmp_path), "--keys", str(tmp_path / "keys.yaml")]) == 2
    with pytest.raises(SystemExit):
        promcse.cli.main(["serve", "--prompts", str(tmp_path), "--prompt-cache-mb", "-1"])


def test_model_labels_are_bounded_to_the_most_requested_names() -> None:
    from promcse.serving.metrics import ServerMetrics

    metrics = ServerMetrics(top_models=2)
    for model in ("a", "a", "b", "c", None):
        metrics.observe("/embed", model, 200, 0.01)
    text = metrics.render()[0].decode()
    assert 'model="a"' in text and 'model="b"' in text and 'model="other"' in text and 'model="c"' not in text
    for _ in range(2):
        metrics.observe("/v1/embeddings", "c", 200, 0.01)  # c (3 requests) overtakes b (1): b's series go
    text = metrics.render()[0].decode()
    assert 'model="c"' in text and 'model="b"' not in text and 'model="-"' in text
    assert sum(1 for line in text.splitlines() if line.startswith("promcse_requests_total{")) <= 2 * 2 + 2


def test_metrics_are_bounded_and_behind_a_metrics_key(ckpts: dict[str, Path], tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", {"alpha": ckpts["a"], "beta": ckpts["b"]})
    with serving(store, metrics_top_models=1, metrics_key="prom-key") as (client, _):
        for model in ("alpha", "alpha", "beta"):
            assert embed(client, model).status_code == 200  # no key needed: the server has no API keys
        assert embed(client, "no-such").status_code == 404
        assert client.get("/metrics").status_code == 401
        assert call(client, "wrong", "GET", "/metrics").status_code == 401
        text = call(client, "prom-key", "GET", "/metrics").text
        assert 'model="alpha"' in text and 'model="other"' in text
        assert 'model="beta"' not in text and "no-such" not in text
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(json.dumps({**KEYS, "watch-key": {"prompts": [], "metrics": True}}))
    with serving(store, keys=read_keys(keys_file), api_key="ops", metrics_key="prom-key") as (client, _):
        for key in ("alice-key", "bob-key"):  # its labels name every namespace's models
            r = call(client, key, "GET", "/metrics")
            assert r.status_code == 403 and r.json()["error"]["status"] == 403
        for key in ("prom-key", "watch-key", "ops"):
            assert call(client, key, "GET", "/metrics").status_code == 200, key
        assert call(client, "prom-key", "GET", "/v1/models").status_code == 401  # the metrics key reads metrics only
        assert call(client, "watch-key", "GET", "/v1/models").json()["data"] == []


def test_start_up_models_are_versioned_like_store_prompts(tenants: tuple[Any, Path], ckpts: dict[str, Path]) -> None:
    from promcse.encoder.backbone import minilm_path
    from promcse.serving.prompt_files import reference_version

    client, _ = tenants
    r = call(client, "alice-key", "POST", "/v1/embeddings", {"input": TEXTS, "model": "alice-base"})
    assert r.headers[HEADER] == r.json()["model_version"] == folder_version(ckpts["c"])
    hits = call(client, "alice-key", "POST", "/search", {"query": "a dog", "index": "alice-idx"})
    assert hits.headers[HEADER] == hits.json()["model_version"] == folder_version(ckpts["c"])
    assert reference_version("minilm") == folder_version(minilm_path())
    assert reference_version("not-a-folder-or-hub-id") == "name:not-a-folder-or-hub-id"


def test_cli_says_when_uploads_would_find_no_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("promcse.cli.serve.run_server", lambda *a, **k: None)  # options only: no server
    monkeypatch.setattr("promcse.cli.serve.load_server", lambda *a, **k: (None, {}))
    (tmp_path / "keys.yaml").write_text('"admin-key": {prompts: ["*"], admin: true}\n')
    store = make_store(tmp_path / "store", {})
    base = ["serve", "--prompts", str(store), "--keys", str(tmp_path / "keys.yaml"), "--device", "cpu"]
    assert promcse.cli.main(base) == 0
    assert "add --store-backbone MODEL" in capsys.readouterr().err
    for extra in (["--store-backbone", "minilm"], ["--model", "m=minilm"]):
        assert promcse.cli.main(base + extra) == 0
        assert "--store-backbone" not in capsys.readouterr().err, extra


def test_cli_serves_a_store_and_takes_a_prompt_while_running(ckpts: dict[str, Path], tmp_path: Path,
                                                             tiny_bert: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from test_serve import free_port

    store = make_store(tmp_path / "store", {"alpha": ckpts["a"]})
    (tmp_path / "keys.yaml").write_text('"admin-key": {prompts: ["*"], admin: true}\n')
    port = free_port()
    argv = [sys.executable, "-m", "promcse", "serve", "--prompts", str(store), "--keys", str(tmp_path / "keys.yaml"),
            "--port", str(port), "--device", "cpu", "--store-backbone", str(tiny_bert)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer admin-key"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        put = httpx.put(url + "/v1/prompts/gamma", json={"files": files_of(ckpts["c"])}, headers=auth, timeout=60)
        assert put.status_code == 201, put.text
        r = httpx.post(url + "/v1/embeddings", json={"input": TEXTS, "model": "gamma"}, headers=auth, timeout=60)
        assert close(vectors(r), want(ckpts["c"])) and r.headers[HEADER] == folder_version(ckpts["c"])
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert process.returncode == 0 and "prompt store" in output, output
