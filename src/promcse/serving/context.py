"""What the server's routes share, below both the app (:mod:`promcse.serving.app`) and the OpenAI routes
(:mod:`promcse.serving.openai_api`): request limits and options, the text checks, the :class:`ServeContext`
(models, indexes, the batching engine or the model thread, metrics) and the fast JSON response.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from promcse.corpus.search import Index
from promcse.serving.batching import BatchEngine, EngineConfig, Job, QueueFull
from promcse.serving.guards import ApiError
from promcse.serving.metrics import ServerMetrics

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
    request_timeout_s: float = 120.0  # a full request (256 x 2,000 chars) encodes in ~21 s on 2 cores: 5x room
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log line or a traceback
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


def fast_json(content: dict[str, Any]) -> Any:
    """A JSON response built with ``json.dumps`` directly: FastAPI's ``jsonable_encoder`` walks every float of
    an embedding list in Python, a cost per request that grows with the number of texts."""
    from fastapi.responses import JSONResponse

    return JSONResponse(content)


async def _on(worker: Executor, work: Callable[[], Any]) -> Any:
    """Run model work on the app's model thread: serialised anyway, and one thread keeps one malloc arena."""
    return await asyncio.get_running_loop().run_in_executor(worker, work)
