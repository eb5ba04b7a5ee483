"""HTTP server: embeddings, similarity and search from many prompts over one backbone, plus a web page.

Endpoints (JSON in and out; every error is ``{"error": {"status": int, "message": str, ...}}``, and on
``/v1/`` routes OpenAI's ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /embed`` ``{"texts": [...], "model": NAME, "normalize": true}`` -> ``{"embeddings", "dim", "model"}``
- ``POST /similarity`` ``{"a": [...], "b": [...], "model": NAME}`` -> ``{"scores": [[...]], "model"}``
- ``POST /search`` ``{"query": "...", "index": NAME, "top_k": k, "threshold": t}`` -> ``{"results": [...]}``
- ``POST /v1/embeddings``, ``GET /v1/models``: the OpenAI embeddings API (:mod:`promcse.serving.openai_api`);
- ``GET /metrics`` (Prometheus), ``GET /health``, ``GET /models``, ``GET /`` (the page: search an index,
  the same query against two indexes side by side, compare two sentences).

With batching on (the default) every text of every request goes through one engine that packs texts of any
prompt into token-bounded forward passes (:mod:`promcse.serving.batching`); a full queue answers 503 with
``Retry-After``, a request waiting longer than ``request_timeout_s`` 504, and a client that disconnects
leaves no work behind. With an API key every route but ``/`` and ``/health`` needs ``Authorization: Bearer
KEY``; with ``allowed_hosts`` other ``Host`` headers are refused (DNS rebinding of a loopback server).

``model``/``index`` default to the first one loaded. Names are looked up in the loaded dictionaries only:
nothing in a request reaches the filesystem. Too many texts, too long a text or too large a body -> 413;
malformed JSON, wrong types or text that is not valid Unicode -> 422; unknown model or index -> 404; bad input
never yields a 500. ``promcse serve`` stops on SIGTERM or SIGINT after finishing the requests in flight (up to
``--graceful-timeout`` seconds) and exits with status 0.
"""

# No ``from __future__ import annotations``: FastAPI reads the request models from the endpoint
# annotations, which live in create_app's scope (fastapi is imported lazily, so ``promcse --help``
# works without the optional serving dependencies).
import asyncio
import re
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from promcse.serving.batching import BatchEngine, EngineConfig, Job, QueueFull
from promcse.encoder.encode import cosine_matrix, unit_rows
from promcse.errors import PromcseError
from promcse.serving.guards import ApiError, BodyLimit, GuardMiddleware, error_body
from promcse.serving.metrics import MetricsMiddleware, ServerMetrics
from promcse.corpus.search import Index

if TYPE_CHECKING:  # the registry pulls in torch and transformers: not at `promcse --help` time
    from promcse.serving.registry import PromptRegistry

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Limits:
    """Request limits: texts per request (each of ``a`` and ``b`` for /similarity), characters per text or
    query, request body bytes, largest ``top_k`` for /search."""

    max_texts: int = 256
    max_chars: int = 2000
    max_body_bytes: int = 2_000_000
    max_top_k: int = 100


@dataclass(frozen=True)
class ServeOptions:
    """How the server runs.

    Attributes:
        engine: Batching limits; None = one request per forward pass on one model thread (``--batching off``).
        request_timeout_s: Longest a request may wait for its embeddings (504 after).
        api_key: Bearer token every route but ``/`` and ``/health`` needs (None: no authentication).
        insecure: Allow a non-loopback bind without an API key.
        allowed_hosts: ``Host`` header names accepted (None: any).
        header_timeout_s: Longest a connection may take to send a request's line and headers (from its
            opening, or from the first byte of a later request); then 408 and the connection is closed.
        body_timeout_s: Longest a request may take to send its whole body once its headers are in (408).
        keep_alive_s: How long an idle keep-alive connection stays open between requests.
        max_connections: Open connections (or requests in progress) beyond which requests get 503.
    """

    engine: EngineConfig | None = field(default_factory=EngineConfig)
    request_timeout_s: float = 30.0
    api_key: str | None = None
    insecure: bool = False
    allowed_hosts: tuple[str, ...] | None = None
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000


def check_texts(texts: list[str], limits: Limits, field: str) -> None:
    """413 for more texts than allowed or a text longer than allowed; 422 for a text that is not valid Unicode."""
    if len(texts) > limits.max_texts:
        raise ApiError(413, f"'{field}' has {len(texts)} texts; the limit is {limits.max_texts} per request",
                       param=field, code="too_many_texts")
    for i, text in enumerate(texts):
        if text.startswith("\ufeff"):  # a byte-order mark is encoding residue, not text to embed
            raise ApiError(422, f"'{field}[{i}]' starts with a byte-order mark (U+FEFF); send the text without it",
                           param=field, code="byte_order_mark")
        if len(text) > limits.max_chars:
            raise ApiError(413, f"'{field}[{i}]' has {len(text)} characters; the limit is {limits.max_chars}",
                           param=field, code="text_too_long")
        try:  # JSON may escape lone surrogates ("\ud800"): valid JSON, but no tokenizer can take them
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            message = f"'{field}[{i}]' is not valid Unicode: lone surrogate at character {err.start}"
            raise ApiError(422, message, param=field, code="invalid_unicode") from None


def _schemas() -> tuple[type, type, type]:
    """Request bodies (pydantic): strict types, no unknown keys."""
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class EmbedRequest(Strict):
        texts: list[StrictStr] = Field(min_length=1)
        model: StrictStr | None = None
        normalize: StrictBool = True

    class SimilarityRequest(Strict):
        a: list[StrictStr] = Field(min_length=1)
        b: list[StrictStr] = Field(min_length=1)
        model: StrictStr | None = None

    class SearchRequest(Strict):
        query: StrictStr
        index: StrictStr | None = None
        top_k: StrictInt = Field(10, ge=1)
        threshold: StrictFloat | None = Field(None, allow_inf_nan=False)  # ints accepted; not "0.5" or true

    return EmbedRequest, SimilarityRequest, SearchRequest


class ServeContext:
    """What the routes share: models, indexes, limits, the batching engine (or the model thread), metrics."""

    def __init__(self, registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]], limits: Limits,
                 options: ServeOptions) -> None:
        self.registry, self.indexes, self.limits, self.options = registry, indexes, limits, options
        self.metrics = ServerMetrics()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promcse-model")
        self.engine = None if options.engine is None else BatchEngine(registry, options.engine, self.metrics.on_batch)
        if self.engine is not None:
            engine = self.engine
            self.metrics.watch_queue(lambda: engine.queued_tokens, lambda: engine.queued_jobs)

    def model_name(self, request: Any, name: str | None, field_name: str = "model") -> str:
        """The requested (or default) model name; 404 when it is not loaded. Recorded for the metrics."""
        names = self.registry.names
        chosen = name if name is not None else (names[0] if names else "")
        if chosen not in self.registry:
            raise ApiError(404, f"unknown model {chosen!r}; available: {', '.join(names)}", param=field_name,
                           code="model_not_found")
        request.state.model = chosen
        return chosen

    async def embed(self, request: Any, texts: list[str], model: str) -> np.ndarray:
        """Raw (N, D) float32 vectors of ``texts`` under ``model``, through the engine or the model thread."""
        return (await self.embed_counted(request, texts, model))[0]

    async def embed_counted(self, request: Any, texts: list[str], model: str) -> tuple[np.ndarray, int]:
        """:meth:`embed` and the number of tokens the texts took (the engine counts them once, on submit)."""
        if self.engine is None:
            def work() -> tuple[np.ndarray, int]:
                vectors = np.asarray(self.registry.encode(texts, model, normalize=False))
                return vectors, sum(self.registry.token_counts(texts, model))
            return await _on(self.worker, work)
        try:
            job = self.engine.submit(texts, model)
        except QueueFull as full:
            raise ApiError(503, f"server busy ({full}); retry shortly", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        return await _wait(job, request, self.options.request_timeout_s), job.tokens

    def close(self) -> None:
        """Drain the engine and stop the model threads."""
        if self.engine is not None:
            self.engine.close()
        self.worker.shutdown(wait=True)


async def _wait(job: Job, request: Any, timeout: float) -> np.ndarray:
    """The job's vectors; cancel it when the client disconnects (499) or the wait passes ``timeout`` (504)."""
    loop = asyncio.get_running_loop()
    waiting, deadline = asyncio.wrap_future(job.future), loop.time() + timeout
    try:
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), min(0.25, max(deadline - loop.time(), 0)))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.future.cancel()
                    raise ApiError(499, "client closed the request") from None
                if loop.time() >= deadline:
                    job.future.cancel()
                    raise ApiError(504, f"no result within {timeout:g} s; the server is overloaded") from None
    except asyncio.CancelledError:  # the server cancels handlers still running after its graceful timeout
        job.future.cancel()
        raise


def create_app(registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]] | None = None,
               limits: Limits | None = None, options: ServeOptions | None = None) -> Any:
    """The FastAPI application for ``registry`` (see :func:`promcse.serving.launch.load_server`), ``indexes``
    (``{name: (index, model name in registry)}``), request ``limits`` and ``options`` (batching, auth).

    ``app.state.close()`` drains the batching engine; :func:`promcse.serving.launch.run_server` calls it on exit.
    """
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, Response

    ctx = ServeContext(registry, indexes or {}, limits or Limits(), options or ServeOptions())
    app = FastAPI(title="promcse", version=_version(), docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=ctx.limits.max_body_bytes, timeout_s=ctx.options.body_timeout_s)
    app.add_middleware(GuardMiddleware, api_key=ctx.options.api_key, allowed_hosts=ctx.options.allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)
    app.state.context, app.state.close = ctx, ctx.close
    _install_error_handlers(app)
    page = resources.files("promcse").joinpath("resources", "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        return HTMLResponse(page, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(registry), "indexes": len(ctx.indexes)}

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/models")
    def models() -> dict[str, Any]:
        listed = [registry.describe(n) for n in registry.names]
        idx = [{"name": n, "size": len(i), "dim": i.dim, "backend": i.kind, "model": m} for n, (i, m) in ctx.indexes.items()]
        return {"models": listed, "indexes": idx, "default_model": registry.names[0] if registry.names else None,
                "limits": ctx.limits.__dict__, "batching": ctx.engine is not None}

    from promcse.serving.openai_api import add_openai_routes

    _add_model_routes(app, ctx)
    _add_search_route(app, ctx)
    add_openai_routes(app, ctx)
    return app


def fast_json(content: dict[str, Any]) -> Any:
    """A JSON response built with ``json.dumps`` directly: FastAPI's ``jsonable_encoder`` walks every float of
    an embedding list in Python, a cost per request that grows with the number of texts."""
    from fastapi.responses import JSONResponse

    return JSONResponse(content)


async def _on(worker: Executor, work: Callable[[], Any]) -> Any:
    """Run model work on the app's model thread: serialised anyway, and one thread keeps one malloc arena."""
    return await asyncio.get_running_loop().run_in_executor(worker, work)


def _add_model_routes(app: Any, ctx: ServeContext) -> None:
    """``POST /embed`` and ``POST /similarity``."""
    from fastapi import Request

    EmbedRequest, SimilarityRequest, _ = _schemas()

    @app.post("/embed")
    async def embed(body: EmbedRequest, request: Request) -> Any:  # type: ignore[valid-type]
        check_texts(body.texts, ctx.limits, "texts")
        name = ctx.model_name(request, body.model)
        vectors = await ctx.embed(request, body.texts, name)
        vectors = unit_rows(vectors) if body.normalize else vectors
        return fast_json({"embeddings": np.asarray(vectors, dtype=np.float32).tolist(), "dim": int(vectors.shape[1]),
                          "model": name})

    @app.post("/similarity")
    async def similarity(body: SimilarityRequest, request: Request) -> dict[str, Any]:  # type: ignore[valid-type]
        check_texts(body.a, ctx.limits, "a")
        check_texts(body.b, ctx.limits, "b")
        name = ctx.model_name(request, body.model)
        vectors = await ctx.embed(request, body.a + body.b, name)
        scores = cosine_matrix(vectors[: len(body.a)], vectors[len(body.a):]).astype(np.float32)
        return {"scores": scores.tolist(), "model": name}


def _add_search_route(app: Any, ctx: ServeContext) -> None:
    """``POST /search``: the query is embedded like any text (batched), then the index is scanned."""
    from fastapi import Request

    _, _, SearchRequest = _schemas()

    @app.post("/search")
    async def search(body: SearchRequest, request: Request) -> dict[str, Any]:  # type: ignore[valid-type]
        check_texts([body.query], ctx.limits, "query")
        if body.top_k > ctx.limits.max_top_k:
            raise ApiError(422, f"top_k is {body.top_k}; the limit is {ctx.limits.max_top_k}")
        name = body.index if body.index is not None else next(iter(ctx.indexes), "")
        if name not in ctx.indexes:
            raise ApiError(404, f"unknown index {name!r}; available: {', '.join(ctx.indexes) or 'none'}")
        index, encoder_name = ctx.indexes[name]
        request.state.model = encoder_name
        query = unit_rows(await ctx.embed(request, [body.query], encoder_name)).astype(np.float32)
        hits = index.search_vectors(query, top_k=body.top_k, threshold=body.threshold)[0]
        return {"results": [h._asdict() for h in hits], "index": name, "model": encoder_name}


def _install_error_handlers(app: Any) -> None:
    """Every error as JSON (OpenAI-shaped on /v1/); validation problems as 422 (400 on /v1/)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def answer(request: Any, status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
        body = error_body(status, message, request.url.path, param=param, code=code, **extra)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Any, exc: ApiError) -> JSONResponse:
        return answer(request, exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        if request.url.path.startswith("/v1/"):  # OpenAI answers 400 naming the parameter
            first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
            param = ".".join(p for p in first["loc"] if p != "body") or None
            return answer(request, 400, f"invalid request: {first['msg']}", param=param, code="invalid_value")
        return answer(request, 422, "invalid request body", detail=detail)

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        # FastAPI answers 400 for a body it cannot decode (e.g. invalid UTF-8): that is malformed JSON too.
        status = 422 if exc.status_code == 400 else exc.status_code
        return answer(request, status, str(exc.detail), headers=exc.headers)

    @app.exception_handler(PromcseError)
    async def promcse_error(request: Any, exc: PromcseError) -> JSONResponse:
        return answer(request, 422, exc.message)  # the message only: never a server file-system path

    @app.exception_handler(Exception)  # a bug, never bad input: same JSON shape; uvicorn logs the traceback
    async def internal_error(request: Any, exc: Exception) -> JSONResponse:
        return answer(request, 500, f"internal error ({type(exc).__name__})")


def _version() -> str:
    from promcse.version import __version__

    return __version__
