"""Starting a server: load the models and indexes, check the options, run uvicorn until SIGTERM/SIGINT.

``promcse serve`` is a thin caller of :func:`load_server` and :func:`run_server`; :class:`BackgroundServer`
runs an app on a loopback port in a thread (tests, notebooks). On SIGTERM or SIGINT the server stops
accepting connections, finishes the requests in flight (the batching engine drains its queue) and returns.
Both run uvicorn with the same settings (:func:`uvicorn_config`): the h11 protocol with a deadline on each
request's headers (:func:`timed_h11`), a keep-alive timeout and a connection limit; the body deadline is
the app's (:class:`promcse.serving.guards.BodyLimit`).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promcse.serving.batching import EngineConfig
from promcse.errors import PromcseError
from promcse.corpus.search import Index, read_meta
from promcse.serving.app import Limits, ServeOptions, create_app

if TYPE_CHECKING:
    from promcse.serving.registry import PromptRegistry

API_KEY_ENV = "PROMCSE_API_KEY"


def check_backend(backend: str, quantize: str, device: str) -> None:
    """Raises PromcseError for a backend, quantisation and device that do not go together (before any load)."""
    if backend not in ("torch", "onnx"):
        raise PromcseError(f"unknown backend '{backend}'; choose torch or onnx", key="backend")
    if backend == "torch" and quantize != "none":
        raise PromcseError("int8 quantisation applies to the onnx backend only", key="quantize")
    if backend == "onnx" and device not in ("auto", "cpu"):
        raise PromcseError(f"the onnx backend runs on the CPU, not device '{device}'", key="device")


def load_server(models: dict[str, str], index_dirs: dict[str, str] | None = None, device: str = "auto",
                backend: str = "torch", quantize: str = "none",
                threads: int = 0) -> tuple["PromptRegistry", dict[str, tuple[Index, str]]]:
    """Load the models (backbones shared) and indexes; each index reuses a served model of the same reference.

    An index whose model is not among ``models`` gets it loaded as ``<index name>-encoder``. ``backend="onnx"``
    runs embedding rows through open-bank ONNX graphs (:mod:`promcse.serving.onnx_rows`; ``quantize`` ``none`` or
    ``int8``, ``threads`` ONNX Runtime threads per graph) on the CPU.
    """
    from promcse.serving.onnx_rows import OnnxRows
    from promcse.serving.registry import load_many

    check_backend(backend, quantize, device)
    registry = load_many(models, device="cpu" if backend == "onnx" else device)
    registry.onnx = OnnxRows(quantize, threads) if backend == "onnx" else None
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
    check_served(registry, indexes, index_dirs or {})
    return registry, indexes


PROBE_TEXTS = ["A man is playing a guitar.", "x"]


def check_served(registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]], dirs: dict[str, str]) -> None:
    """Refuse to start with a model that gives non-finite vectors, or an index that does not fit its model.

    Raises:
        PromcseError: Naming the model or the index directory and what is wrong.
    """
    import numpy as np

    for name in registry.names:
        vectors = np.asarray(registry.encode(PROBE_TEXTS, name, normalize=False))
        if not np.isfinite(vectors).all():
            raise PromcseError(f"model {name!r} produces NaN or infinite embeddings; its prompt or head is damaged")
    for name, (index, encoder_name) in indexes.items():
        dim = registry.get(encoder_name).dim
        if len(index) and index.dim != dim:
            raise PromcseError(f"index holds {index.dim}-dimensional vectors but its model {encoder_name!r} gives "
                               f"{dim}", path=dirs.get(name))
        # every stored vector scored once (up to 200k: a few ms; FAISS/numpy keep NaN scores out of a short top-k)
        probe = index.search_vectors(np.full((1, dim), dim ** -0.5, dtype=np.float32), top_k=min(len(index), 200_000))
        if any(not np.isfinite(hit.score) for hits in probe for hit in hits) or sum(map(len, probe)) < min(len(index), 200_000):
            raise PromcseError("index returns non-finite scores (NaN vectors?); rebuild it", path=dirs.get(name))


MAX_HEAD_BYTES = 16 * 1024  # an incomplete request head h11 buffers (its own default, made explicit); beyond: 400


def timed_h11(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's line and headers.

    The clock starts when the connection opens, and for each later request at its first byte (between
    requests, an idle connection is uvicorn's keep-alive timeout's); a request whose head is not complete by
    then gets ``408`` and the connection is closed. uvicorn alone times out only an idle keep-alive
    connection, and cancels that as soon as one byte arrives, so a client sending its headers a byte at a
    time (or connecting and sending nothing) would hold its connection forever.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        head_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self.head_timer is not None:  # a request's head is in
                self.head_timer.cancel()
                self.head_timer = None

        def data_received(self, data: bytes) -> None:
            if self.head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of a request after the previous one: its head's deadline starts
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                close_with_408(self, f"request headers not received within {header_timeout_s:g} s")

    return TimedH11Protocol


def close_with_408(protocol: Any, message: str) -> None:
    """Answer ``408 Request Timeout`` (plain text) on an h11 connection between requests, then close it."""
    import h11

    body = message.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
               (b"content-length", str(len(body)).encode())]
    try:
        for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                      h11.Data(data=body), h11.EndOfMessage()):
            protocol.transport.write(protocol.conn.send(event))
    except h11.LocalProtocolError:  # mid-way through something else: just close
        pass
    protocol.transport.close()


def uvicorn_config(app: Any, options: ServeOptions, **settings: Any) -> Any:
    """The uvicorn settings every promcse server runs with (``promcse serve`` and :class:`BackgroundServer`)."""
    import uvicorn

    # http: h11, pinned rather than uvicorn's "auto" (httptools whenever it is installed, e.g. pulled in by
    # ray): one parser everywhere whatever else is installed, the one the header deadline (timed_h11) and
    # the incomplete-head cap (h11_max_incomplete_event_size) are built on; parsing is never the bottleneck here
    # (a forward pass is). loop: asyncio rather than "auto" (uvloop when installed), for the same reason.
    # ws: none; no route is a WebSocket, so an upgrade request is answered as plain HTTP.
    return uvicorn.Config(app, http=timed_h11(options.header_timeout_s), loop="asyncio", ws="none",
                          timeout_keep_alive=options.keep_alive_s, limit_concurrency=options.max_connections,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, **settings)


def app_options(app: Any) -> ServeOptions:
    """The :class:`ServeOptions` an app from :func:`create_app` was built with (defaults for another app)."""
    context = getattr(getattr(app, "state", None), "context", None)
    return getattr(context, "options", None) or ServeOptions()


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
        self.server = uvicorn.Server(uvicorn_config(app, app_options(app), log_level="warning", lifespan="off"))
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
        close = getattr(getattr(self.server.config.app, "state", None), "close", None)
        if callable(close):
            close()  # drain and stop the app's batching engine


def check_server_options(port: int, graceful_timeout: float, host: str = "127.0.0.1", api_key: str | None = None,
                         insecure: bool = False, engine: EngineConfig | None = None,
                         limits: Limits | None = None, keys: Any = None) -> None:
    """Check :func:`run_server`'s options (cheap: call it before loading models).

    Raises:
        PromcseError: A port outside 1..65535, a negative graceful timeout, batching limits that admit
            nothing, or a non-loopback ``host`` without an API key or ``keys`` (a
            :class:`promcse.serving.tenants.KeyRing`) unless ``insecure``.
    """
    if not 0 < port < 65536:
        raise PromcseError(f"must be in 1..65535, got {port}", key="port")
    if api_key is not None and (not api_key or any(c.isspace() or not c.isprintable() for c in api_key)):
        # A header value cannot carry these; the key itself is never echoed (it would land in logs).
        raise PromcseError("must be printable characters without spaces (any script: it is compared as UTF-8 "
                           "bytes)", key="api_key")
    if graceful_timeout < 0:
        raise PromcseError(f"must be at least 0 seconds, got {graceful_timeout}", key="graceful_timeout")
    if engine is not None:
        engine.check()
    if limits is not None and min(limits.max_texts, limits.max_chars, limits.max_body_bytes, limits.max_top_k) < 1:
        raise PromcseError(f"request limits must all be at least 1, got {limits}")
    if not is_loopback(host) and not api_key and not keys and not insecure:
        raise PromcseError(f"{host} is reachable from other machines: set api_key (or ${API_KEY_ENV}) so that "
                           "requests need 'Authorization: Bearer KEY', or pass insecure=True", key="host")


def check_connection_options(options: ServeOptions) -> None:
    """Refuse timeouts or a connection limit that would admit nothing or never time out.

    Raises:
        PromcseError: Naming the :class:`ServeOptions` field as its key.
    """
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
        value = getattr(options, name)
        if not 0 < value <= 86_400:
            raise PromcseError(f"must be in (0, 86400] seconds, got {value}", key=name)
    if options.max_connections < 1:
        raise PromcseError(f"must be at least 1, got {options.max_connections}", key="max_connections")


def api_key_from(value: str | None) -> str | None:
    """The API key: the option, else the environment variable ``PROMCSE_API_KEY``, else none."""
    return value or os.environ.get(API_KEY_ENV) or None


def host_guarded(host: str, options: ServeOptions) -> ServeOptions:
    """``options`` for a server bound to ``host``: on loopback (unless given) only loopback ``Host`` names are
    accepted, so a web page cannot reach the server through DNS rebinding. Used by every engine."""
    if is_loopback(host) and options.allowed_hosts is None:
        return ServeOptions(**{**options.__dict__, "allowed_hosts": ("127.0.0.1", "localhost", "[::1]", "::1")})
    return options


def run_server(registry: "PromptRegistry", indexes: dict[str, tuple[Index, str]] | None = None, *,
               host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
               graceful_timeout: int = 30, options: ServeOptions | None = None) -> signal.Signals | None:
    """Serve ``registry`` and ``indexes`` (see :func:`load_server`) with uvicorn in this thread until stopped.

    On SIGTERM or SIGINT the server stops accepting connections, finishes the requests in flight (for up to
    ``graceful_timeout`` seconds, then cancels them) and returns; the previous signal handlers are restored.

    Returns:
        The signal that stopped the server, or None when it stopped otherwise.

    Raises:
        PromcseError: Bad ``port`` or ``graceful_timeout`` (see :func:`check_server_options`).
    """
    import uvicorn

    options = options or ServeOptions()
    check_server_options(port, graceful_timeout, host, options.api_key, options.insecure, options.engine, limits,
                         options.keys)
    check_connection_options(options)
    indexes = indexes or {}
    options = host_guarded(host, options)
    app = create_app(registry, indexes, limits, options)
    app.state.context.warm_versions()
    if not is_loopback(host) and not options.api_key and not options.keys:
        print(f"warning: listening on {host} without an API key (insecure); put it behind a proxy")
    mode = "batching across requests" if options.engine is not None else "one request per forward pass"
    store = f", the prompt store {options.prompts_dir} (loaded on first use)" if options.prompts_dir else ""
    print(f"serving {len(registry)} model(s) [{', '.join(registry.names)}]{store} and {len(indexes)} index(es) "
          f"on {len(registry.backbones)} shared backbone(s), {mode}: http://{host}:{port}/")
    server = uvicorn.Server(uvicorn_config(app, options, host=host, port=port, log_level="info",
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
        app.state.close()
    return signal.Signals(stopped_by[0]) if stopped_by else None


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
