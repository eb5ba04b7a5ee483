"""HTTP server: embeddings, similarity and search from many prompts over one backbone, plus a web page.

Endpoints (JSON in and out; every error is ``{"error": {"status": int, "message": str, ...}}``, and on
``/v1/`` routes OpenAI's ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /embed`` ``{"texts": [...], "model": NAME, "normalize": true, "input_type": "query" | "document"}`` ->
  ``{"embeddings", "dim", "model"}``; ``input_type`` (default ``document``) picks a role pair's role
  (:mod:`promcse.models.roles`) and is accepted and ignored for any other model;
- ``POST /similarity`` ``{"a": [...], "b": [...], "model": NAME, "input_type_a": "query", "input_type_b":
  "document"}`` -> ``{"scores": [[...]], "model"}`` (each side's role, default ``document``)
- ``POST /search`` ``{"query": "...", "index": NAME, "top_k": k, "threshold": t}`` -> ``{"results": [...]}``
- ``POST /v1/embeddings``, ``GET /v1/models``: the OpenAI embeddings API (:mod:`promcse.serving.openai_api`);
- ``GET /v1/prompts``, ``GET``/``PUT``/``DELETE /v1/prompts/NAME``: the prompt store (:mod:`promcse.serving.store`)
  and its admin API (:mod:`promcse.serving.prompts_api`);
- ``GET /metrics`` (Prometheus), ``GET /health``, ``GET /models``, ``GET /`` (the page: search an index,
  the same query against two indexes side by side, compare two sentences).

With batching on (the default) every text of every request goes through one engine that packs texts of any
prompt into token-bounded forward passes (:mod:`promcse.serving.batching`); a full queue answers 503 with
``Retry-After``, a request waiting longer than ``request_timeout_s`` 504, and a client that disconnects
leaves no work behind. With an API key every route but ``/`` and ``/health`` needs ``Authorization: Bearer
KEY``; with ``allowed_hosts`` other ``Host`` headers are refused (DNS rebinding of a loopback server).

``model``/``index`` default to the first one loaded. A ``model`` is a model loaded at start-up, else a prompt of
the prompt store (loaded on first use; a name must match ``NAME_RE`` before the store folder is looked at, so no
request names a path). Every embeddings, similarity and search response names the model's version (field
``model_version``, header ``X-Promcse-Model-Version``). With API keys (:mod:`promcse.serving.tenants`) a key sees
only the model names of its namespace: any other is answered 404, as a name that does not exist. Too many texts, too long a text or too large a body -> 413;
malformed JSON, wrong types or text that is not valid Unicode -> 422; unknown model or index -> 404; bad input
never yields a 500. ``promcse serve`` stops on SIGTERM or SIGINT after finishing the requests in flight (up to
``--graceful-timeout`` seconds) and exits with status 0.
"""

# No ``from __future__ import annotations``: FastAPI reads the request models from the endpoint
# annotations, which live in create_app's scope (fastapi is imported lazily, so ``promcse --help``
# works without the optional serving dependencies).
import asyncio
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from promcse.corpus.search import Index
from promcse.encoder.encode import cosine_matrix, unit_rows
from promcse.errors import PromcseError
from promcse.serving.context import NAME_RE, Limits, ServeContext, ServeOptions, Served, check_texts, fast_json
from promcse.serving.guards import ApiError, BodyLimit, GuardMiddleware, error_body
from promcse.serving.metrics import MetricsMiddleware
from promcse.serving.openai_api import add_openai_routes
from promcse.serving.prompts_api import add_prompt_routes

if TYPE_CHECKING:  # the registry pulls in torch and transformers: not at `promcse --help` time
    from promcse.serving.registry import PromptRegistry

__all__ = ["NAME_RE", "Limits", "ServeOptions", "Served", "create_app"]


def _schemas() -> tuple[type, type, type]:
    """Request bodies (pydantic): strict types, no unknown keys."""
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class EmbedRequest(Strict):
        texts: list[StrictStr] = Field(min_length=1)
        model: StrictStr | None = None
        normalize: StrictBool = True
        input_type: Literal["query", "document"] | None = None
        truncate: StrictBool = False

    class SimilarityRequest(Strict):
        a: list[StrictStr] = Field(min_length=1)
        b: list[StrictStr] = Field(min_length=1)
        model: StrictStr | None = None
        input_type_a: Literal["query", "document"] | None = None
        input_type_b: Literal["query", "document"] | None = None

    class SearchRequest(Strict):
        query: StrictStr
        index: StrictStr | None = None
        top_k: StrictInt = Field(10, ge=1)
        threshold: StrictFloat | None = Field(None, allow_inf_nan=False)  # ints accepted; not "0.5" or true

    return EmbedRequest, SimilarityRequest, SearchRequest


def create_app(registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]] | None = None,
               limits: Limits | None = None, options: ServeOptions | None = None) -> Any:
    """The FastAPI application for ``registry`` (see :func:`promcse.serving.launch.load_server`), ``indexes``
    (``{name: (index, model name in registry)}``), request ``limits`` and ``options`` (batching, auth).

    ``app.state.close()`` drains the batching engine; :func:`promcse.serving.launch.run_server` calls it on exit.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response

    ctx = ServeContext(registry, indexes or {}, limits or Limits(), options or ServeOptions())
    app = FastAPI(title="promcse", version=_version(), docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=ctx.limits.max_body_bytes, timeout_s=ctx.options.body_timeout_s,
                       upload_bytes=ctx.limits.max_upload_bytes)
    app.add_middleware(GuardMiddleware, keys=ctx.keys, allowed_hosts=ctx.options.allowed_hosts,
                       open_tenant=ctx.open_tenant, metrics_key=ctx.options.metrics_key)
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
    def models(request: Request) -> dict[str, Any]:
        tenant = ctx.tenant(request)
        names = [n for n in registry.names if tenant.sees(n)]
        idx = [{"name": n, "size": len(i), "dim": i.dim, "backend": i.kind, "model": m}
               for n, (i, m) in ctx.indexes.items() if tenant.sees(m)]
        stored = [n for n in ctx.visible_models(tenant) if n not in registry]
        return {"models": [registry.describe(n) for n in names], "prompts": stored, "indexes": idx,
                "default_model": names[0] if names else None, "limits": ctx.limits.__dict__,
                "batching": ctx.engine is not None}

    _add_model_routes(app, ctx)
    _add_search_route(app, ctx)
    add_openai_routes(app, ctx)
    add_prompt_routes(app, ctx)
    return app


def _add_model_routes(app: Any, ctx: ServeContext) -> None:
    """``POST /embed`` and ``POST /similarity``."""
    from fastapi import Request

    EmbedRequest, SimilarityRequest, _ = _schemas()

    @app.post("/embed")
    async def embed(body: EmbedRequest, request: Request) -> Any:  # type: ignore[valid-type]
        texts = check_texts(body.texts, ctx.limits, "texts", body.truncate)
        served = await ctx.served(request, body.model)
        entry = ctx.entry(served, body.input_type)
        ctx.fit(texts, entry, "texts", body.truncate)
        vectors = await ctx.embed(request, texts, entry)
        vectors = unit_rows(vectors) if body.normalize else vectors
        return fast_json({"embeddings": np.ascontiguousarray(vectors, dtype=np.float32), "dim": int(vectors.shape[1]),
                          "model": served.name, "model_version": served.version}, served.headers)

    @app.post("/similarity")
    async def similarity(body: SimilarityRequest, request: Request) -> Any:  # type: ignore[valid-type]
        check_texts(body.a, ctx.limits, "a")
        check_texts(body.b, ctx.limits, "b")
        served = await ctx.served(request, body.model)
        entry_a, entry_b = (ctx.entry(served, t) for t in (body.input_type_a, body.input_type_b))
        if entry_a == entry_b:
            vectors = await ctx.embed(request, body.a + body.b, entry_a)
            va, vb = vectors[: len(body.a)], vectors[len(body.a):]
        else:  # two roles of a pair: both requests wait in the engine together and share its batches
            va, vb = await asyncio.gather(ctx.embed(request, body.a, entry_a), ctx.embed(request, body.b, entry_b))
        scores = cosine_matrix(va, vb).astype(np.float32)
        return fast_json({"scores": np.ascontiguousarray(scores), "model": served.name, "model_version": served.version},
                         served.headers)


def _add_search_route(app: Any, ctx: ServeContext) -> None:
    """``POST /search``: the query is embedded like any text (batched), then the index is scanned."""
    from fastapi import Request

    _, _, SearchRequest = _schemas()

    @app.post("/search")
    async def search(body: SearchRequest, request: Request) -> Any:  # type: ignore[valid-type]
        check_texts([body.query], ctx.limits, "query")
        if body.top_k > ctx.limits.max_top_k:
            raise ApiError(422, f"top_k is {body.top_k}; the limit is {ctx.limits.max_top_k}")
        tenant = ctx.tenant(request)
        visible = [n for n, (_, model) in ctx.indexes.items() if tenant.sees(model)]  # an index is its model's
        name = body.index if body.index is not None else next(iter(visible), "")
        if name not in visible:
            raise ApiError(404, f"unknown index {name!r}; available: {', '.join(visible) or 'none'}")
        index, encoder_name = ctx.indexes[name]
        served = await ctx.served(request, encoder_name)
        query = unit_rows(await ctx.embed(request, [body.query], ctx.entry(served, "query")))
        query = query.astype(np.float32)
        hits = index.search_vectors(query, top_k=body.top_k, threshold=body.threshold)[0]
        return fast_json({"results": [h._asdict() for h in hits], "index": name, "model": encoder_name,
                          "model_version": served.version}, served.headers)


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
            param = ".".join(p for p in first["loc"] if p not in ("body", "query")) or None
            return answer(request, 400, f"invalid request: {first['msg']}", param=param, code="invalid_value")
        return answer(request, 422, "invalid request body", detail=detail)

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        # FastAPI answers 400 for a body it cannot decode (e.g. invalid UTF-8): malformed JSON, 422 on our routes
        # like every other malformed body; OpenAI's routes answer 400 for it, as OpenAI does.
        status = 422 if exc.status_code == 400 and not request.url.path.startswith("/v1/") else exc.status_code
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
