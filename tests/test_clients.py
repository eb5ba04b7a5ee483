"""The clients people already use, against ``promcse serve``'s OpenAI-compatible ``/v1/embeddings`` (docs/CLIENTS.md).

A real uvicorn server (:class:`promcse.serving.launch.BackgroundServer`, the settings ``promcse serve`` uses) serves
two tiny random checkpoints, ``news`` and ``legal``, behind an API key. Each client must return, for the model its
``model`` names, the vectors the server itself sends over plain HTTP and the vectors of
``promcse.load(checkpoint).encode(texts, normalize_embeddings=True)`` (OpenAI-style answers are unit vectors), to
1e-5: the official ``openai`` client (which asks for base64 by default), LangChain's ``OpenAIEmbeddings`` (with
``check_embedding_ctx_length=False``) and LlamaIndex's ``OpenAIEmbedding`` (with ``model_name=``). The two models'
vectors differ by far more than the tolerance, so a client routed to the wrong model fails. LangChain and
LlamaIndex are skipped where they are not installed (the ``test`` and ``clients`` extras install them). Nothing
here reaches the internet: the clients talk to the loopback server only.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import promcse  # noqa: E402
from conftest import make_prompt_checkpoint  # noqa: E402
from promcse.serving.app import Limits, ServeOptions, create_app  # noqa: E402
from promcse.serving.launch import BackgroundServer, load_server  # noqa: E402

KEY = "sk-promcse-test"
MODELS = ("news", "legal")
TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field near the old barn.", "x",
         "Ein Hund läuft — 犬が走る — une phrase accentuée", "The court dismissed the appeal on procedural grounds."]
DIMS = 8
TOL = 1e-5


@pytest.fixture(scope="module")
def served(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("clients")
    paths = {"news": make_prompt_checkpoint(tiny_bert, root / "news", pooler="cls", head="always", length=3, seed=1),
             "legal": make_prompt_checkpoint(tiny_bert, root / "legal", pooler="avg", head="none", length=3, seed=2)}
    registry, indexes = load_server({name: str(path) for name, path in paths.items()}, device="cpu")
    with BackgroundServer(create_app(registry, indexes, Limits(), ServeOptions(api_key=KEY))) as server:
        yield SimpleNamespace(url=server.url, base=server.url + "/v1", paths=paths)


@pytest.fixture(scope="module")
def expected(served) -> dict[str, np.ndarray]:
    """Each model's unit vectors of TEXTS from the Python API (the reference every client must match)."""
    return {name: np.asarray(promcse.load(str(path), device="cpu").encode(TEXTS, normalize_embeddings=True))
            for name, path in served.paths.items()}


def shortened(vectors: np.ndarray, d: int) -> np.ndarray:
    """OpenAI's ``dimensions``: the first ``d`` components, renormalised."""
    head = vectors[:, :d]
    return head / np.linalg.norm(head, axis=1, keepdims=True)


def assert_same(got: object, want: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.abs(got - want).max() <= TOL, f"max difference {np.abs(got - want).max():.3g}"


def http_vectors(served, model: str, texts: list[str] | str, **extra: object) -> np.ndarray:
    """The server's own answer over plain HTTP, decoded whatever ``encoding_format`` was asked for."""
    r = httpx.post(served.base + "/embeddings", json={"input": texts, "model": model, **extra},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    if extra.get("encoding_format") == "base64":
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    return np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)


class Recorder:
    """An ``httpx.Client`` that keeps the JSON body of every request it sends (what the client library asked for)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.client = httpx.Client(event_hooks={"request": [self.record]}, timeout=60)

    def record(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/embeddings"):
            self.bodies.append(json.loads(request.content))


# ---- the reference: the server over plain HTTP and the Python API agree; the two models differ --------------

def test_models_differ_by_far_more_than_the_tolerance(expected) -> None:
    assert expected["news"].shape == expected["legal"].shape == (len(TEXTS), expected["news"].shape[1])
    assert np.abs(expected["news"] - expected["legal"]).max(axis=1).min() > 100 * TOL  # every row tells them apart


@pytest.mark.parametrize("model", MODELS)
def test_plain_http_matches_encode_in_float_and_base64(served, expected, model: str) -> None:
    floats = http_vectors(served, model, TEXTS, encoding_format="float")
    assert_same(floats, expected[model])
    np.testing.assert_array_equal(http_vectors(served, model, TEXTS, encoding_format="base64"), floats)
    assert_same(http_vectors(served, model, TEXTS[1]), expected[model][1:2])  # one string, default float
    assert_same(http_vectors(served, model, TEXTS, dimensions=DIMS), shortened(expected[model], DIMS))


# ---- the official openai client ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_openai_client_list_single_and_base64_default(served, expected, model: str) -> None:
    recorder = Recorder()
    client = openai.OpenAI(base_url=served.base, api_key=KEY, max_retries=0, http_client=recorder.client)
    listed = client.embeddings.create(model=model, input=TEXTS)  # encoding_format not given: the client asks base64
    single = client.embeddings.create(model=model, input=TEXTS[3])
    floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert recorder.bodies[0]["encoding_format"] == "base64" and recorder.bodies[0]["input"] == TEXTS
    assert recorder.bodies[2]["encoding_format"] == "float"
    assert listed.model == model and [d.index for d in listed.data] == list(range(len(TEXTS)))
    assert all(isinstance(x, float) for x in listed.data[0].embedding)  # base64 decoded by the client
    assert_same([d.embedding for d in listed.data], expected[model])
    assert_same([d.embedding for d in floats.data], expected[model])
    assert_same([single.data[0].embedding], expected[model][3:4])
    assert_same([d.embedding for d in listed.data], http_vectors(served, model, TEXTS))
    assert listed.usage.prompt_tokens == listed.usage.total_tokens > 0


def test_openai_client_dimensions_models_and_errors(served, expected) -> None:
    client = openai.OpenAI(base_url=served.base, api_key=KEY, max_retries=0)
    short = client.embeddings.create(model="legal", input=TEXTS, dimensions=DIMS)
    assert_same([d.embedding for d in short.data], shortened(expected["legal"], DIMS))
    assert_same([d.embedding for d in short.data], http_vectors(served, "legal", TEXTS, dimensions=DIMS))
    assert [m.id for m in client.models.list().data] == list(MODELS)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="news", input="x", dimensions=10_000)  # more than the model has
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.base, api_key="wrong", max_retries=0).embeddings.create(model="news", input="x")


def test_async_openai_client(served, expected) -> None:
    async def run() -> list[list[float]]:
        async with openai.AsyncOpenAI(base_url=served.base, api_key=KEY, max_retries=0) as client:
            out = await client.embeddings.create(model="news", input=TEXTS)
        return [d.embedding for d in out.data]

    assert_same(asyncio.run(run()), expected["news"])


# ---- LangChain: OpenAIEmbeddings ------------------------------------------------------------------------------

def langchain(served, model: str, **options: object):
    langchain_openai = pytest.importorskip("langchain_openai")
    # check_embedding_ctx_length=False: send the texts; the default tokenises them with tiktoken (which downloads
    # its encoding files) and sends token ids, which promcse does not take.
    return langchain_openai.OpenAIEmbeddings(model=model, base_url=served.base, api_key=KEY,
                                             check_embedding_ctx_length=False, max_retries=0, **options)


@pytest.mark.parametrize("model", MODELS)
def test_langchain_documents_and_query(served, expected, model: str) -> None:
    recorder = Recorder()
    embeddings = langchain(served, model, http_client=recorder.client)
    assert_same(embeddings.embed_documents(TEXTS), expected[model])
    assert_same([embeddings.embed_query(TEXTS[4])], expected[model][4:5])
    assert [body["input"] for body in recorder.bodies] == [TEXTS, [TEXTS[4]]]  # texts went out, not token ids
    assert all(body["model"] == model for body in recorder.bodies)
    assert_same(embeddings.embed_documents(TEXTS), http_vectors(served, model, TEXTS))


def test_langchain_chunks_dimensions_and_async(served, expected) -> None:
    recorder = Recorder()
    chunked = langchain(served, "legal", chunk_size=2, http_client=recorder.client)
    assert_same(chunked.embed_documents(TEXTS), expected["legal"])  # three requests, order kept
    assert [len(body["input"]) for body in recorder.bodies] == [2, 2, 1]
    assert_same(langchain(served, "legal", dimensions=DIMS).embed_documents(TEXTS), shortened(expected["legal"], DIMS))
    news = langchain(served, "news")

    async def run() -> tuple[list[list[float]], list[float]]:  # one event loop: the async client lives in it
        return await news.aembed_documents(TEXTS), await news.aembed_query(TEXTS[0])

    documents, query = asyncio.run(run())
    assert_same(documents, expected["news"])
    assert_same([query], expected["news"][:1])


# ---- LlamaIndex: OpenAIEmbedding ------------------------------------------------------------------------------

def llama_index(served, model: str, **options: object):
    module = pytest.importorskip("llama_index.embeddings.openai")
    # model_name=: any name; model= accepts only OpenAI's own model names (ValueError otherwise).
    return module.OpenAIEmbedding(model_name=model, api_base=served.base, api_key=KEY, max_retries=0, **options)


@pytest.mark.parametrize("model", MODELS)
def test_llama_index_text_batch_and_query(served, expected, model: str) -> None:
    recorder = Recorder()
    embedding = llama_index(served, model, http_client=recorder.client)
    assert_same(embedding.get_text_embedding_batch(TEXTS), expected[model])
    assert_same([embedding.get_query_embedding(TEXTS[2])], expected[model][2:3])
    assert_same([embedding.get_text_embedding(TEXTS[3])], expected[model][3:4])
    assert all(body["model"] == model for body in recorder.bodies) and recorder.bodies[0]["input"] == TEXTS
    assert_same(embedding.get_text_embedding_batch(TEXTS), http_vectors(served, model, TEXTS))


def test_llama_index_batches_dimensions_async_and_names(served, expected) -> None:
    module = pytest.importorskip("llama_index.embeddings.openai")
    recorder = Recorder()
    batched = llama_index(served, "legal", embed_batch_size=2, http_client=recorder.client)
    assert_same(batched.get_text_embedding_batch(TEXTS), expected["legal"])
    assert [len(body["input"]) for body in recorder.bodies] == [2, 2, 1]
    assert_same(llama_index(served, "legal", dimensions=DIMS).get_text_embedding_batch(TEXTS),
                shortened(expected["legal"], DIMS))
    news = llama_index(served, "news")

    async def run() -> tuple[list[list[float]], list[float]]:  # one event loop: the async client lives in it
        return await news.aget_text_embedding_batch(TEXTS), await news.aget_query_embedding(TEXTS[0])

    texts, query = asyncio.run(run())
    assert_same(texts, expected["news"])
    assert_same([query], expected["news"][:1])
    # LlamaIndex replaces newlines by spaces before sending: "a\nb" is embedded as "a b"
    batched.get_text_embedding("line one\nline two")
    assert recorder.bodies[-1]["input"] == ["line one line two"]
    with pytest.raises(ValueError):
        module.OpenAIEmbedding(model="news", api_base=served.base, api_key=KEY)  # model=: OpenAI's names only


# ---- the server's limits the clients' defaults can run into ----------------------------------------------------

def test_client_batches_must_fit_the_server_limits(served) -> None:
    """LangChain sends up to ``chunk_size`` (default 1000) texts a request, over ``--max-texts`` (default 256): 413,
    fixed by ``chunk_size`` <= ``--max-texts``. A text over ``--max-chars`` is 413 whatever the client."""
    limit = Limits().max_texts
    many = [f"sentence number {i}" for i in range(limit + 1)]
    with pytest.raises(openai.APIStatusError) as too_many:
        langchain(served, "news").embed_documents(many)
    assert too_many.value.status_code == 413 and too_many.value.body["code"] == "too_many_texts"
    vectors = np.asarray(langchain(served, "news", chunk_size=limit).embed_documents(many))
    assert vectors.shape[0] == len(many)
    assert_same(vectors[[0, limit]], http_vectors(served, "news", [many[0], many[limit]]))
    with pytest.raises(openai.APIStatusError) as too_long:
        llama_index(served, "news").get_text_embedding("word " * Limits().max_chars)
    assert too_long.value.status_code == 413 and too_long.value.body["code"] == "text_too_long"
