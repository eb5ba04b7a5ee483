"""Scale-out on Ray Serve: the same server (:func:`promcse.serving.app.create_app`) in N replicas behind Ray's proxy.

``promcse serve --engine ray --replicas N`` deploys one Ray Serve application, ``promcse``, whose one deployment
runs N replicas of :class:`Replica`. Each replica is a Ray actor that loads every ``--model`` and ``--index``
once (prompts over one backbone share it, as in ``promcse serve``) and serves the same FastAPI app: ``/embed``,
``/similarity``, ``/search``, ``/v1/embeddings``, ``/metrics``, ``/`` and the rest, with the same limits, errors
and authentication. Ray's HTTP proxy listens on ``--host``/``--port`` and spreads requests over the replicas.

The prompt travels in the request (``"model": NAME``), so every replica can answer every request, and batching
stays ours inside each replica: its :class:`promcse.serving.batching.BatchEngine` packs the texts of all the requests
it holds, of any prompt, into shared forward passes (Ray Serve's ``@serve.batch`` and model multiplexing would
split them by model). A replica takes ``cpus_per_replica`` CPUs from Ray and runs that many torch threads.

``ray`` is an optional extra (``pip install 'promcse[ray]'``) imported only when these functions run.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from promcse.io.allocator import limit_malloc_arenas
from promcse.errors import PromcseError
from promcse.serving.launch import check_connection_options, check_server_options, host_guarded, load_server
from promcse.serving.app import Limits, ServeOptions, create_app

APP_NAME = "promcse"
MAX_ONGOING_REQUESTS = 256  # per replica; Ray's default (5) would starve the batching engine of requests


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica serves: the ``--model``/``--index`` pairs (paths must exist on every node) and how.

    Attributes:
        models: ``{name: model reference}``.
        indexes: ``{name: index directory}``.
        device: ``auto``, ``cpu`` or ``cuda`` (a replica sees only the GPUs Ray gave it).
        limits: Request limits.
        options: Batching, timeout and authentication options.
        malloc_arenas: Cap on glibc's malloc arenas in each replica's process (0: glibc's default). Applied by
            the replica itself: a cap set in the launching process does not reach Ray's worker processes.
        backend: ``torch`` or ``onnx`` (open-bank ONNX graphs, :mod:`promcse.serving.onnx_rows`; the replicas of a
            machine share the export in the ONNX cache, exported once).
        quantize: With ``onnx``: ``none`` or ``int8``.
        onnx_threads: ONNX Runtime threads per graph (0: the replica's CPUs).
    """

    models: dict[str, str]
    indexes: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    limits: Limits = field(default_factory=Limits)
    options: ServeOptions = field(default_factory=ServeOptions)
    malloc_arenas: int = 0
    backend: str = "torch"
    quantize: str = "none"
    onnx_threads: int = 0


@dataclass(frozen=True)
class RayServeConfig:
    """How the replicas are placed.

    Attributes:
        replicas: Number of replicas (one backbone copy each).
        cpus_per_replica: CPUs Ray reserves per replica; also its number of torch threads (at least 1).
        gpus_per_replica: GPUs Ray reserves per replica (0: CPU only).
        address: A running Ray cluster (``auto``, ``HOST:6379``); None: start a local Ray instance.
        graceful_timeout_s: How long a stopping replica waits for its requests in flight.
    """

    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    address: str | None = None
    graceful_timeout_s: float = 30.0

    def check(self) -> None:
        """Raises PromcseError for a placement Ray could not honour."""
        if self.replicas < 1:
            raise PromcseError(f"must be at least 1, got {self.replicas}", key="replicas")
        if not 0 < self.cpus_per_replica <= 1024:
            raise PromcseError(f"must be in (0, 1024], got {self.cpus_per_replica}", key="cpus_per_replica")
        if not 0 <= self.gpus_per_replica <= 64:
            raise PromcseError(f"must be in [0, 64], got {self.gpus_per_replica}", key="gpus_per_replica")
        if self.graceful_timeout_s < 0:
            raise PromcseError(f"must be at least 0 seconds, got {self.graceful_timeout_s}", key="graceful_timeout_s")


class Replica:
    """One Ray Serve replica: loads the models and indexes once and serves :func:`create_app`'s app.

    Ray Serve builds the app through ``__serve_build_asgi_app__`` after the constructor (``@serve.ingress()``
    without an app), and calls ``__del__`` when the replica stops: the batching engine then drains.
    """

    def __init__(self, spec: ReplicaSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        if spec.malloc_arenas:
            limit_malloc_arenas(spec.malloc_arenas)  # before the model load allocates
        registry, indexes = load_server(spec.models, spec.indexes, device=spec.device, backend=spec.backend,
                                        quantize=spec.quantize, threads=spec.onnx_threads or max(1, threads))
        self.asgi = create_app(registry, indexes, spec.limits, spec.options)  # ("app" is Ray's wrapper's)

    def __serve_build_asgi_app__(self) -> Any:
        """The ASGI app this replica serves."""
        return self.asgi

    def __del__(self) -> None:
        close = getattr(getattr(getattr(self, "asgi", None), "state", None), "close", None)
        if callable(close):
            close()


def _ray_serve() -> Any:
    """``ray.serve``, or a PromcseError saying how to install it."""
    try:
        from ray import serve
    except ImportError:
        raise PromcseError("serving on Ray needs Ray Serve: pip install 'promcse[ray]'") from None
    return serve


def _absolute(spec: ReplicaSpec) -> ReplicaSpec:
    """Local model and index paths made absolute: a replica does not run in this working directory."""
    models = {name: str(Path(ref).resolve()) if Path(ref).exists() else ref for name, ref in spec.models.items()}
    indexes = {name: str(Path(directory).resolve()) for name, directory in spec.indexes.items()}
    return ReplicaSpec(**{**spec.__dict__, "models": models, "indexes": indexes})


def build_app(spec: ReplicaSpec, config: RayServeConfig) -> Any:
    """The Ray Serve application (``Deployment.bind``) of ``config.replicas`` replicas serving ``spec``."""
    serve = _ray_serve()
    resources: dict[str, float] = {"num_cpus": config.cpus_per_replica}
    if config.gpus_per_replica:
        resources["num_gpus"] = config.gpus_per_replica
    deployment = serve.deployment(
        serve.ingress()(Replica), name=APP_NAME, num_replicas=config.replicas, ray_actor_options=resources,
        max_ongoing_requests=MAX_ONGOING_REQUESTS, graceful_shutdown_timeout_s=config.graceful_timeout_s,
        max_constructor_retry_count=1)  # a replica that cannot load its models fails the deployment at once
    return deployment.bind(spec, int(config.cpus_per_replica))


def check_deployment(spec: ReplicaSpec, config: RayServeConfig, host: str, port: int) -> None:
    """Check every option before Ray starts (cheap).

    Raises:
        PromcseError: Naming the option (see :func:`promcse.serving.launch.check_server_options`).
    """
    config.check()
    check_server_options(port, config.graceful_timeout_s, host, spec.options.api_key, spec.options.insecure,
                         spec.options.engine, spec.limits, spec.options.keys)
    check_connection_options(spec.options)


def deploy(spec: ReplicaSpec, config: RayServeConfig, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve's proxy on ``host:port`` (Ray must be initialised) and run the app; returns its URL once
    every replica is up.

    Raises:
        PromcseError: Bad options, or replicas that failed to start (e.g. a model that does not load).
    """
    serve = _ray_serve()
    check_deployment(spec, config, host, port)
    spec = ReplicaSpec(**{**_absolute(spec).__dict__, "options": host_guarded(host, spec.options)})
    serve.start(http_options={"host": host, "port": port,
                              "keep_alive_timeout_s": max(1, round(spec.options.keep_alive_s))})
    try:
        serve.run(build_app(spec, config), name=APP_NAME, route_prefix="/")
    except RuntimeError as err:  # the replica's traceback is in the deployment's status message
        raise PromcseError(f"the Ray Serve replicas did not start: {_failure(serve, err)}") from None
    return f"http://{host}:{port}/"


def _failure(serve: Any, err: Exception) -> str:
    """The last line of a failed deployment's message (the replica's exception), else ``err`` itself."""
    try:
        message = serve.status().applications[APP_NAME].deployments[APP_NAME].message
    except (KeyError, AttributeError):
        message = str(err)
    lines = [line.strip() for line in (message or str(err)).splitlines() if line.strip()]
    return lines[-1].removeprefix("promcse.errors.PromcseError: ") if lines else str(err)


def serve_on_ray(spec: ReplicaSpec, config: RayServeConfig, host: str = "127.0.0.1",
                 port: int = 8000) -> signal.Signals:
    """Deploy on Ray and block until SIGTERM or SIGINT, then take the app down and shut Ray down cleanly.

    Uses the Ray connection already open in this process, else ``config.address``, else a new local
    instance. Only what this call started is stopped: the app always; Serve and Ray when it started them.

    Returns:
        The signal that stopped the server.
    """
    serve = _ray_serve()
    import ray

    check_deployment(spec, config, host, port)  # before Ray starts
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
    # SIGTERM is ours from here on (Ray's own handler would end the process without taking the app down): one
    # arriving while the replicas start stops the server as soon as they are up. SIGINT (Ctrl+C) still aborts a
    # deployment that hangs, and is ours once the app is up.
    stop, received = threading.Event(), []
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _recorder(stop, received))}
    try:
        url = deploy(spec, config, host, port)
        print(f"serving {len(spec.models)} model(s) [{', '.join(spec.models)}] and {len(spec.indexes)} index(es) "
              f"on {config.replicas} Ray Serve replica(s), {config.cpus_per_replica:g} CPU each: {url}", flush=True)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _recorder(stop, received))
        while not stop.wait(0.5):
            pass
        return signal.Signals(received[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            serve.shutdown()  # drains and stops the replicas, the proxy and the controller
            ray.shutdown()
        else:
            serve.delete(APP_NAME)  # a cluster's Serve may hold other applications


def _recorder(stop: threading.Event, received: list[int]) -> Callable[[int, object], None]:
    """A signal handler that records the signal and sets ``stop``."""

    def on_signal(sig: int, frame: object) -> None:
        received.append(sig)
        stop.set()

    return on_signal
