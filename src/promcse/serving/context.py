"""What the server's routes share, below both the app (:mod:`promcse.serving.app`) and the OpenAI and prompt
routes (:mod:`promcse.serving.openai_api`, :mod:`promcse.serving.prompts_api`): request limits and options, the
text checks, the :class:`ServeContext` (models, the prompt store, keys, indexes, the batching engine or the
model thread, metrics), the model a request uses (:class:`Served`: name, version, encoder) and the fast JSON
response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from promcse.corpus.search import Index
from promcse.errors import PromcseError
from promcse.serving.batching import BatchEngine, EngineConfig, Job, QueueFull
from promcse.serving.guards import ApiError
from promcse.serving.metrics import ServerMetrics
from promcse.serving.store import NAME_RE, PromptStore, StoredPrompt, reference_version
from promcse.serving.tenants import KeyRing, Tenant, key_ring

if TYPE_CHECKING:  # the registry pulls in torch and transformers: not at `promcse --help` time
    from promcse.serving.registry import PromptRegistry

__all__ = ["NAME_RE", "VERSION_HEADER", "Limits", "ServeContext", "ServeOptions", "Served", "check_texts", "check_tokens", "fast_json", "json_bytes"]

VERSION_HEADER = "X-Promcse-Model-Version"  # on every embeddings, similarity and search response


@dataclass(frozen=True)
class Limits:
    """Request limits: texts per request (each of ``a`` and ``b`` for /similarity), characters per text or
    query, request body bytes, largest ``top_k`` for /search, and body bytes of a prompt upload
    (``PUT /v1/prompts/NAME``: base64 files)."""

    max_texts: int = 256
    max_chars: int = 2000
    max_body_bytes: int = 2_000_000
    max_top_k: int = 100
    max_upload_bytes: int = 32_000_000


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
        prompts_dir: The prompt store folder (:mod:`promcse.serving.store`); None: no store.
        prompt_cache_mb: Most MiB of prompt + head tensors the store keeps loaded (LRU).
        keys: API keys and their namespaces (:mod:`promcse.serving.tenants`); ``api_key`` is added to them as an
            every-prompt, non-admin key.
        allow_admin_without_keys: With no key configured at all, allow the admin routes to every caller
            (refused by default).
        metrics_key: A bearer key that reads ``GET /metrics`` and nothing else; once set, ``/metrics`` needs it
            or a key with ``metrics: true`` (the single ``api_key`` has it) even on a server without keys.
        metrics_top_models: Model names with their own ``model`` label value in the metrics (the most requested
            ones); the others are counted as ``other``.
        store_backbones: Backbones loaded at start so that prompts uploaded through the admin API may use them
            (an upload may use only a backbone the server holds: these, the start-up models', or one a store
            prompt has loaded).
    """

    engine: EngineConfig | None = field(default_factory=EngineConfig)
    request_timeout_s: float = 120.0  # a full request (256 x 2,000 chars) encodes in ~21 s on 2 cores: 5x room
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log line or a traceback
    insecure: bool = False
    allowed_hosts: tuple[str, ...] | None = None
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000
    prompts_dir: str | None = None
    prompt_cache_mb: float = 256.0
    keys: KeyRing | None = field(default=None, repr=False)
    allow_admin_without_keys: bool = False
    metrics_key: str | None = field(default=None, repr=False)
    metrics_top_models: int = 50
    store_backbones: tuple[str, ...] = ()


def check_texts(texts: list[str], limits: Limits, field: str, truncate: bool = False) -> list[str]:
    """413 for more texts than allowed or a text longer than allowed (with ``truncate``: cut to the limit instead);
    422 for a text that is not valid Unicode. Returns the texts to embed."""
    if truncate:
        texts = [text[: limits.max_chars] for text in texts]
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
    return texts


def check_tokens(texts: list[str], encoder: Any, field: str) -> None:
    """413 for a text longer than the model takes in tokens (its position limit less its prompt's shift), naming it
    and saying how to have it cut (``truncate``); TEI and OpenAI refuse such input too, rather than embed a part."""
    limit = encoder.max_length
    # Only texts that could be too long are tokenized here (the engine tokenizes every text again): no tokenizer
    # makes more than two tokens of one UTF-8 byte (a SentencePiece word marker and a byte fallback), plus a few
    # special tokens, so shorter texts — nearly all of them — skip this pass.
    suspects = [i for i, text in enumerate(texts) if 2 * len(text.encode("utf-8")) + 4 > limit]
    if not suspects:
        return
    tokens = encoder.tokenizer([texts[i] for i in suspects], truncation=False, verbose=False)["input_ids"]
    for i, ids in zip(suspects, tokens):
        count = len(ids)
        if count > limit:
            raise ApiError(413, f"'{field}[{i}]' is {count} tokens; this model takes at most {limit}: shorten it, or "
                           "send \"truncate\": true to embed its first tokens", param=field, code="text_too_long")


@dataclass(frozen=True)
class Served:
    """The model a request uses: its name, its version, and what encodes it (``model``: the registry name of a
    model loaded at start-up, or a store prompt's loaded encoder or role pair, held for the whole request)."""

    name: str
    version: str
    model: Any

    @property
    def headers(self) -> dict[str, str]:
        """The response header naming the version."""
        return {VERSION_HEADER: self.version}


class ServeContext:
    """What the routes share: models, the prompt store, keys, indexes, limits, the batching engine (or the model
    thread), metrics."""

    def __init__(self, registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]], limits: Limits,
                 options: ServeOptions) -> None:
        self.registry, self.indexes, self.limits, self.options = registry, indexes, limits, options
        self.metrics = ServerMetrics(top_models=options.metrics_top_models)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promcse-model")
        self.store_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promcse-store")
        self.keys = key_ring(options.keys, options.api_key)
        self.open_tenant = Tenant(("*",), admin=options.allow_admin_without_keys,  # with no keys configured
                                  metrics=not options.metrics_key)
        self.store = None if options.prompts_dir is None else PromptStore(
            options.prompts_dir, registry, int(options.prompt_cache_mb * 2 ** 20))
        if self.store is not None:
            self.metrics.watch_store(self.store)
        for backbone in options.store_backbones:
            registry.hold_backbone(backbone)
        self._versions: dict[str, str] = {}
        self.engine = None if options.engine is None else BatchEngine(registry, options.engine, self.metrics.on_batch)
        if self.engine is not None:
            engine = self.engine
            self.metrics.watch_queue(lambda: engine.queued_tokens, lambda: engine.queued_jobs)

    def tenant(self, request: Any) -> Tenant:
        """Who is asking (set by :class:`promcse.serving.guards.GuardMiddleware` from the bearer key)."""
        return getattr(request.state, "tenant", None) or self.open_tenant

    def visible_models(self, tenant: Tenant) -> list[str]:
        """Model names ``tenant`` sees: start-up models first, then the store's prompts (a start-up name wins)."""
        names = [n for n in self.registry.names if tenant.sees(n)]
        stored = self.store.names() if self.store is not None else []
        return names + [n for n in stored if tenant.sees(n) and n not in self.registry]

    def model_name(self, request: Any, name: str | None, field_name: str = "model") -> str:
        """The requested (or default) start-up model name the caller may use; 404 otherwise. Recorded for the
        metrics. (Store prompts: :meth:`served`.)"""
        tenant = self.tenant(request)
        names = [n for n in self.registry.names if tenant.sees(n)]
        chosen = name if name is not None else (names[0] if names else "")
        if chosen not in self.registry or not tenant.sees(chosen):
            raise self.not_found(chosen, names, field_name)
        request.state.model = chosen
        return chosen

    def not_found(self, name: str, names: list[str], field_name: str = "model") -> ApiError:
        """The 404 of a model name that is not there (or not the caller's: the same answer)."""
        more = " and the prompts GET /v1/prompts lists" if self.store is not None else ""
        return ApiError(404, f"unknown model {name!r}; available: {', '.join(names) or 'none'}{more}",
                        param=field_name, code="model_not_found")

    async def served(self, request: Any, name: str | None, field_name: str = "model") -> Served:
        """The model a request names (or the default): a start-up model, else a store prompt (loaded now if
        needed); 404 for a name that is neither, or outside the caller's namespace."""
        tenant = self.tenant(request)
        if name is None or name in self.registry or self.store is None:
            chosen = self.model_name(request, name, field_name)
            return Served(chosen, await self.model_version(chosen), chosen)
        stored = await self.stored(name) if tenant.sees(name) else None
        if stored is None:
            raise self.not_found(name, [n for n in self.registry.names if tenant.sees(n)], field_name)
        request.state.model = name
        return Served(name, stored.version, stored.model)

    async def stored(self, name: str) -> StoredPrompt | None:
        """A store prompt, loaded off the event loop when it is not loaded or its folder changed; 503 when its
        folder does not load."""
        assert self.store is not None
        store = self.store
        hit = store.peek(name) if NAME_RE.match(name) else None
        if hit is not None:
            return hit
        try:
            return await on_thread(self.store_worker, lambda: store.acquire(name))
        except PromcseError as err:
            raise ApiError(503, f"prompt {name!r} is in the store but does not load: {err.message}",
                           code="model_unavailable") from None

    async def model_version(self, name: str) -> str:
        """The version of a start-up model (hashed once, off the event loop; see
        :func:`promcse.serving.store.reference_version`)."""
        if name not in self._versions:
            ref = self.registry.reference(name)
            self._versions[name] = await asyncio.get_running_loop().run_in_executor(None, reference_version, ref)
        return self._versions[name]

    def warm_versions(self) -> None:
        """Hash every start-up model's version now (blocking; ``promcse serve`` does it before listening, so no
        first request waits for a large model folder to be read)."""
        for name in self.registry.names:
            self._versions.setdefault(name, reference_version(self.registry.reference(name)))

    def fit(self, texts: list[str], entry: Any, field: str, truncate: bool) -> None:
        """Refuse texts over the model's token limit unless ``truncate`` (see :func:`check_tokens`)."""
        if not truncate:
            check_tokens(texts, self.registry.resolve(entry), field)

    def entry(self, served: Served, input_type: str | None) -> Any:
        """What encodes ``input_type`` (``query``/``document``, None: document) for ``served``: a registry entry
        name, or a store prompt's encoder (a role pair's side)."""
        if isinstance(served.model, str):
            return self.registry.entry(served.model, input_type)
        if hasattr(served.model, "roles"):
            from promcse.serving.registry import DEFAULT_ROLE

            return served.model.side(input_type or DEFAULT_ROLE)
        return served.model

    async def embed(self, request: Any, texts: list[str], model: Any) -> np.ndarray:
        """Raw (N, D) float32 vectors of ``texts`` under ``model``, through the engine or the model thread."""
        return (await self.embed_counted(request, texts, model))[0]

    async def embed_counted(self, request: Any, texts: list[str], model: Any) -> tuple[np.ndarray, int]:
        """:meth:`embed` and the number of tokens the texts took (the engine counts them once, on submit)."""
        if self.engine is None:
            def work() -> tuple[np.ndarray, int]:
                vectors = np.asarray(self.registry.encode(texts, model, normalize=False))
                return vectors, sum(self.registry.token_counts(texts, model))
            vectors, tokens = await on_thread(self.worker, work)
        else:
            try:
                job = self.engine.submit(texts, model)
            except QueueFull as full:
                raise ApiError(503, f"server busy ({full}); retry shortly", code="overloaded",
                               headers={"Retry-After": "1"}) from None
            vectors, tokens = await _wait(job, request, self.options.request_timeout_s), job.tokens
        if not np.isfinite(vectors).all():  # never a 200 with NaN (or null) in it
            raise ApiError(500, "the model produced non-finite numbers for this input; the prompt or model may be "
                           "damaged", code="non_finite_output")
        return vectors, tokens

    def close(self) -> None:
        """Drain the engine and stop the model and store threads."""
        if self.engine is not None:
            self.engine.close()
        self.worker.shutdown(wait=True)
        self.store_worker.shutdown(wait=True)


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


def fast_json(content: dict[str, Any], headers: dict[str, str] | None = None, status: int = 200) -> Any:
    """A JSON response built by :func:`json_bytes` directly: FastAPI's ``jsonable_encoder`` walks every float of
    an embedding list in Python, a cost per request that grows with the number of texts."""
    from starlette.responses import Response

    return Response(json_bytes(content), status_code=status, headers=headers, media_type="application/json")


def json_bytes(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON; numpy arrays are written as (nested) lists.

    orjson (the ``serve`` extra) writes a float32 array's numbers in the shortest form that reads back to the same
    float32, in C: the standard library's encoder spent a tenth of a busy ONNX server's samples on an 8-text
    response (and 17 digits a number, where 9 suffice). Its one difference, NaN written as ``null``, cannot
    reach it: :meth:`ServeContext.embed_counted` refuses non-finite vectors. Without orjson: ``json.dumps``,
    refusing NaN.
    """
    try:
        import orjson
    except ImportError:
        import json

        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                          default=_plain).encode("utf-8")
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY, default=_plain)


def _plain(value: Any) -> Any:
    """What the JSON encoders cannot write themselves: numpy arrays (non-contiguous ones, for orjson) and scalars."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


async def on_thread(worker: Executor, work: Callable[[], Any]) -> Any:
    """Run blocking work on one of the app's threads (model work on the model thread: serialised anyway, and one
    thread keeps one malloc arena; store loads and writes on the store thread)."""
    return await asyncio.get_running_loop().run_in_executor(worker, work)
