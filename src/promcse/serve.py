"""HTTP server: embeddings, similarity and search from many prompts over one backbone, plus a web page.

Endpoints (JSON in and out; every error is ``{"error": {"status": int, "message": str, ...}}``):

- ``POST /embed`` ``{"texts": [...], "model": NAME, "normalize": true}`` -> ``{"embeddings", "dim", "model"}``
- ``POST /similarity`` ``{"a": [...], "b": [...], "model": NAME}`` -> ``{"scores": [[...]], "model"}``
- ``POST /search`` ``{"query": "...", "index": NAME, "top_k": k, "threshold": t}`` -> ``{"results": [...]}``
- ``GET /health``, ``GET /models``, ``GET /`` (the page: search an index, compare two sentences).

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
import ipaddress
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promcse.errors import PromcseError
from promcse.search import Index, read_meta

if TYPE_CHECKING:  # the registry pulls in torch and transformers: not at `promcse --help` time
    from promcse.registry import PromptRegistry

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Limits:
    """Request limits: texts per request (each of ``a`` and ``b`` for /similarity), characters per text or
    query, request body bytes, largest ``top_k`` for /search."""

    max_texts: int = 256
    max_chars: int = 2000
    max_body_bytes: int = 2_000_000
    max_top_k: int = 100


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"status": status, "message": message, **extra}}


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared length, or counted while streaming)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException

        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            message = f"request body over {self.max_bytes} bytes" if declared.isdigit() else "bad Content-Length"
            status = 413 if declared.isdigit() else 400
            return await JSONResponse(error_body(status, message), status_code=status)(scope, receive, send)
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI re-raises HTTPExceptions from reading the body as they are
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def _check_texts(texts: list[str], limits: Limits, field: str) -> None:
    """413 for more texts than allowed or a text longer than allowed; 422 for a text that is not valid Unicode."""
    if len(texts) > limits.max_texts:
        raise ApiError(413, f"'{field}' has {len(texts)} texts; the limit is {limits.max_texts} per request")
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise ApiError(413, f"'{field}[{i}]' has {len(text)} characters; the limit is {limits.max_chars}")
        try:  # JSON may escape lone surrogates ("\ud800"): valid JSON, but no tokenizer can take them
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            message = f"'{field}[{i}]' is not valid Unicode: lone surrogate at character {err.start}"
            raise ApiError(422, message) from None


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


def create_app(registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]] | None = None,
               limits: Limits | None = None) -> Any:
    """The FastAPI application for ``registry`` (see :func:`promcse.registry.load_many`), ``indexes``
    (``{name: (index, model name in registry)}``) and request ``limits``."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    limits, indexes = limits or Limits(), indexes or {}
    app = FastAPI(title="promcse", version=_version(), docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    _install_error_handlers(app)
    page = resources.files("promcse").joinpath("resources", "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        return HTMLResponse(page, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(registry), "indexes": len(indexes)}

    @app.get("/models")
    def models() -> dict[str, Any]:
        listed = [registry.describe(n) for n in registry.names]
        idx = [{"name": n, "size": len(i), "dim": i.dim, "backend": i.kind, "model": m} for n, (i, m) in indexes.items()]
        return {"models": listed, "indexes": idx, "default_model": registry.names[0] if registry.names else None,
                "limits": limits.__dict__}

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promcse-model")  # see _on
    _add_model_routes(app, registry, limits, worker)
    _add_search_route(app, registry, indexes, limits, worker)
    return app


async def _on(worker: Executor, work: Callable[[], Any]) -> Any:
    """Run model work on the app's model thread: serialised anyway, and one thread keeps one malloc arena."""
    return await asyncio.get_running_loop().run_in_executor(worker, work)


def _model_name(registry: "PromptRegistry", name: str | None) -> str:
    """The requested (or default) model name; 404 when it is not loaded."""
    chosen = name if name is not None else (registry.names[0] if registry.names else "")
    if chosen not in registry:
        raise ApiError(404, f"unknown model {chosen!r}; available: {', '.join(registry.names)}")
    return chosen


def _add_model_routes(app: Any, registry: "PromptRegistry", limits: Limits, worker: Executor) -> None:
    """``POST /embed`` and ``POST /similarity``."""
    EmbedRequest, SimilarityRequest, _ = _schemas()

    @app.post("/embed")
    async def embed(request: EmbedRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        _check_texts(request.texts, limits, "texts")
        name = _model_name(registry, request.model)
        vectors = await _on(worker, lambda: registry.encode(request.texts, name, normalize=request.normalize).tolist())
        return {"embeddings": vectors, "dim": len(vectors[0]), "model": name}

    @app.post("/similarity")
    async def similarity(request: SimilarityRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        _check_texts(request.a, limits, "a")
        _check_texts(request.b, limits, "b")
        name = _model_name(registry, request.model)
        return {"scores": await _on(worker, lambda: registry.similarity(request.a, request.b, name).tolist()),
                "model": name}


def _add_search_route(app: Any, registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]],
                      limits: Limits, worker: Executor) -> None:
    """``POST /search``."""
    _, _, SearchRequest = _schemas()

    @app.post("/search")
    async def search(request: SearchRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        _check_texts([request.query], limits, "query")
        if request.top_k > limits.max_top_k:
            raise ApiError(422, f"top_k is {request.top_k}; the limit is {limits.max_top_k}")
        name = request.index if request.index is not None else next(iter(indexes), "")
        if name not in indexes:
            raise ApiError(404, f"unknown index {name!r}; available: {', '.join(indexes) or 'none'}")
        index, encoder_name = indexes[name]

        def run() -> list[dict[str, Any]]:
            with registry.lock:  # the index's encoder is one of the registry's
                hits = index.search([request.query], top_k=request.top_k, threshold=request.threshold)[0]
            return [h._asdict() for h in hits]
        return {"results": await _on(worker, run), "index": name, "model": encoder_name}


def _install_error_handlers(app: Any) -> None:
    """Every error as ``{"error": {...}}``; validation problems as 422 with a compact detail list."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Any, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse(error_body(422, "invalid request body", detail=detail), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        # FastAPI answers 400 for a body it cannot decode (e.g. invalid UTF-8): that is malformed JSON too.
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse(error_body(status, str(exc.detail)), status_code=status, headers=exc.headers)

    @app.exception_handler(PromcseError)
    async def promcse_error(request: Any, exc: PromcseError) -> JSONResponse:
        return JSONResponse(error_body(422, str(exc)), status_code=422)

    @app.exception_handler(Exception)  # a bug, never bad input: same JSON shape; uvicorn logs the traceback
    async def internal_error(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__})"), status_code=500)


def _version() -> str:
    from promcse import __version__

    return __version__


def parse_named(values: list[str] | None, what: str) -> dict[str, str]:
    """``NAME=VALUE`` pairs (a bare VALUE is named after its last path component).

    Raises:
        PromcseError: Invalid or duplicate names.
    """
    out: dict[str, str] = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep:
            name, value = Path(item.rstrip("/")).name or item, item
        if not NAME_RE.match(name) or not value:
            raise PromcseError(f"bad --{what} {item!r}: use NAME={what.upper()}, NAME of letters, digits, '.', '_', '-'")
        if name in out:
            raise PromcseError(f"--{what} name {name!r} given twice")
        out[name] = value
    return out


def load_server(models: dict[str, str], index_dirs: dict[str, str] | None = None,
                device: str = "auto") -> tuple["PromptRegistry", dict[str, tuple[Index, str]]]:
    """Load the models (backbones shared) and indexes; each index reuses a served model of the same reference.

    An index whose model is not among ``models`` gets it loaded as ``<index name>-encoder``.
    """
    from promcse.registry import load_many

    registry = load_many(models, device=device)
    indexes: dict[str, tuple[Index, str]] = {}
    for name, directory in (index_dirs or {}).items():
        ref = read_meta(Path(directory)).get("model")
        if not ref:
            raise PromcseError("index records no model reference; rebuild it with 'promcse index build'", path=directory)
        encoder_name = registry.find(str(ref))
        if encoder_name is None:
            encoder_name = f"{name}-encoder"
            registry.add(encoder_name, str(ref))
        indexes[name] = (Index.load(directory, encoder=registry.get(encoder_name)), encoder_name)
    return registry, indexes


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread on a loopback port (tests, notebooks).

    Example:
        >>> with BackgroundServer(app) as server:  # doctest: +SKIP
        ...     httpx.get(server.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def check_server_options(port: int, graceful_timeout: float) -> None:
    """Check :func:`run_server`'s ``port`` and ``graceful_timeout`` (cheap: call it before loading models).

    Raises:
        PromcseError: A port outside 1..65535 or a negative graceful timeout.
    """
    if not 0 < port < 65536:
        raise PromcseError(f"--port must be in 1..65535, got {port}")
    if graceful_timeout < 0:
        raise PromcseError(f"--graceful-timeout must be at least 0 seconds, got {graceful_timeout}")


def run_server(registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]] | None = None, *,
               host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
               graceful_timeout: int = 30) -> signal.Signals | None:
    """Serve ``registry`` and ``indexes`` (see :func:`load_server`) with uvicorn in this thread until stopped.

    On SIGTERM or SIGINT the server stops accepting connections, finishes the requests in flight (for up to
    ``graceful_timeout`` seconds, then cancels them) and returns; the previous signal handlers are restored.

    Returns:
        The signal that stopped the server, or None when it stopped otherwise.

    Raises:
        PromcseError: Bad ``port`` or ``graceful_timeout`` (see :func:`check_server_options`).
    """
    import uvicorn

    check_server_options(port, graceful_timeout)
    indexes = indexes or {}
    app = create_app(registry, indexes, limits)
    if not _is_loopback(host):
        print(f"warning: listening on {host}: the API has no authentication; put it behind a proxy")
    print(f"serving {len(registry)} model(s) [{', '.join(registry.names)}] and {len(indexes)} index(es) "
          f"on {len(registry.backbones)} shared backbone(s): http://{host}:{port}/")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                          timeout_graceful_shutdown=graceful_timeout))
    stopped_by: list[int] = []

    def on_signal(sig: int, frame: object) -> None:
        # Until uvicorn installs its handlers, and when it replays the signal after its graceful shutdown
        # (the default handlers would then kill the process with the signal or raise KeyboardInterrupt).
        stopped_by.append(sig)
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()  # on SIGTERM/SIGINT: stop accepting, finish requests in flight, then return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return signal.Signals(stopped_by[0]) if stopped_by else None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
