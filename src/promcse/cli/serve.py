"""``promcse serve``: a thin caller of :func:`promcse.serving.launch.run_server` (``--engine ray``:
:func:`promcse.serving.ray_serve.serve_on_ray`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from promcse.io.allocator import limit_malloc_arenas
from promcse.serving.batching import EngineConfig
from promcse.cli.common import POSITIVE_INT, add_common, bounded
from promcse.errors import PromcseError
from promcse.serving.context import NAME_RE
from promcse.serving.launch import (API_KEY_ENV, api_key_from, check_backend, check_server_options, is_loopback,
                                    load_server, run_server)
from promcse.serving.app import Limits, ServeOptions

# ServeOptions' and RayServeConfig's names that are not an option's dest: the option they come from
METRICS_KEY_ENV = "PROMCSE_METRICS_KEY"
KEY_DESTS = {"header_timeout_s": "header_timeout", "body_timeout_s": "body_timeout",
             "keep_alive_s": "keep_alive_timeout", "graceful_timeout_s": "graceful_timeout"}


def parse_named(values: list[str] | None, what: str) -> dict[str, str]:
    """``--model``/``--index`` ``NAME=VALUE`` pairs (a bare VALUE is named after its last path component).

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


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """Batching, timeout, authentication and prompt-store options from the command line."""
    from promcse.serving.tenants import check_key_text, read_keys

    engine = None if args.batching == "off" else EngineConfig(
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue_tokens=args.max_queue_tokens,
        idle_trim=args.idle_trim == "on")
    metrics_key = args.metrics_key or os.environ.get(METRICS_KEY_ENV) or None
    if metrics_key is not None:
        check_key_text(metrics_key, "the metrics key", option="metrics_key")
    if args.prompts is not None and not Path(args.prompts).is_dir():
        raise PromcseError(f"--prompts {args.prompts}: not a folder (create it; it may start empty)")
    return ServeOptions(engine=engine, request_timeout_s=args.request_timeout, api_key=api_key_from(args.api_key),
                        insecure=args.insecure, header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                        keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections,
                        prompts_dir=args.prompts, prompt_cache_mb=args.prompt_cache_mb,
                        keys=read_keys(args.keys) if args.keys else None,
                        allow_admin_without_keys=args.allow_admin_without_keys,
                        metrics_key=metrics_key,
                        metrics_top_models=args.metrics_top_models,
                        store_backbones=tuple(args.store_backbone or ()))


def require_serving_extra() -> None:
    """The HTTP server's packages are an optional extra: say how to install them instead of an ImportError."""
    import importlib

    missing = []
    for package in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise PromcseError(f"promcse serve needs {' and '.join(missing)}, which the [serve] extra installs: "
                           "pip install 'promcse[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    """``promcse serve``: load models and indexes, then serve until interrupted."""
    require_serving_extra()  # before any option checks or model loads
    if not args.model and args.prompts is None:
        raise PromcseError("give --model NAME=MODEL (repeatable), --prompts DIR, or both")
    options = serve_options(args)
    if args.prompts is not None and not args.model and not options.store_backbones and (
            options.keys is not None or options.allow_admin_without_keys):
        print("promcse serve: note: no backbone is loaded at start, so uploads (PUT /v1/prompts/NAME) are refused "
              "until a store prompt has loaded one; add --store-backbone MODEL (e.g. minilm) to take them from the "
              "start", file=sys.stderr)
    if not is_loopback(args.host) and not options.api_key and not options.keys and not options.insecure:
        raise PromcseError(f"--host {args.host} is reachable from other machines: set --api-key (or ${API_KEY_ENV}) "
                           "or --keys so that requests need 'Authorization: Bearer KEY', or pass --insecure")
    check_server_options(args.port, args.graceful_timeout, args.host, options.api_key, options.insecure,
                         options.engine, keys=options.keys)  # before the slow model load
    models, index_dirs = parse_named(args.model, "model"), parse_named(args.index, "index")
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars)
    if args.engine == "ray":
        stopped_by = _serve_on_ray(args, models, index_dirs, limits, options)
    else:
        if args.replicas != 1 or args.address or args.cpus_per_replica != 1:
            raise PromcseError("--replicas, --cpus-per-replica and --address need --engine ray")
        if args.malloc_arenas:
            limit_malloc_arenas(args.malloc_arenas)  # before the model load and the server's threads allocate
        registry, indexes = load_server(models, index_dirs, device=args.device, backend=args.backend,
                                        quantize=args.quantize, threads=args.onnx_threads)
        stopped_by = run_server(registry, indexes, host=args.host, port=args.port, limits=limits,
                                graceful_timeout=args.graceful_timeout, options=options)
    if stopped_by is not None:
        print(f"promcse serve: stopped by {stopped_by.name}", flush=True)
    return 0


def _serve_on_ray(args: argparse.Namespace, models: dict[str, str], index_dirs: dict[str, str], limits: Limits,
                  options: ServeOptions) -> Any:
    """``--engine ray``: ``--replicas`` replicas of the same app on Ray Serve, until SIGTERM/SIGINT."""
    from promcse.serving.ray_serve import RayServeConfig, ReplicaSpec, serve_on_ray

    check_backend(args.backend, args.quantize, args.device)  # here, not in each replica

    spec = ReplicaSpec(models=models, indexes=index_dirs, device=args.device, limits=limits, options=options,
                       malloc_arenas=args.malloc_arenas, backend=args.backend, quantize=args.quantize,
                       onnx_threads=args.onnx_threads)
    config = RayServeConfig(replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                            gpus_per_replica=1.0 if args.device == "cuda" else 0.0, address=args.address,
                            graceful_timeout_s=args.graceful_timeout)
    return serve_on_ray(spec, config, host=args.host, port=args.port)


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``promcse`` command line."""
    p = subparsers.add_parser("serve", help="HTTP API and web page: embed, similarity, search")
    p.add_argument("--model", action="append", metavar="NAME=MODEL",
                   help="model to serve, loaded at start (repeatable; checkpoints on one backbone share it in memory)")
    p.add_argument("--index", action="append", metavar="NAME=DIR", help="index directory to serve (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port (default: 8000)")
    add_common(p, batch_size=False, progress=False)
    p.add_argument("--max-texts", type=POSITIVE_INT, default=Limits.max_texts, help="texts per request (default: %(default)s)")
    p.add_argument("--max-chars", type=POSITIVE_INT, default=Limits.max_chars, help="characters per text (default: %(default)s)")
    p.add_argument("--graceful-timeout", type=bounded(int, 0, 3600), default=30, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, wait this long for requests in flight before cancelling them "
                        "(default: %(default)s)")
    _add_engine_options(p)
    _add_store_options(p)
    _add_connection_options(p)
    _add_scale_options(p)
    p.set_defaults(func=cmd_serve, _key_dests=KEY_DESTS)


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    """``--engine ray``: replicas of the same server on Ray Serve (the [ray] extra)."""
    p.add_argument("--engine", choices=("uvicorn", "ray"), default="uvicorn",
                   help="uvicorn: one server process here; ray: --replicas copies of the same server behind Ray "
                        "Serve's proxy on --host/--port (pip install 'promcse[ray]') (default: %(default)s)")
    p.add_argument("--replicas", type=bounded(int, 1, 1024), default=1,
                   help="with --engine ray: replicas, each with its own copy of the backbone (default: %(default)s)")
    p.add_argument("--cpus-per-replica", type=bounded(float, 0.01, 1024), default=1.0,
                   help="with --engine ray: CPUs Ray reserves per replica, also its torch threads; --device cuda "
                        "gives each replica one GPU (default: %(default)s)")
    p.add_argument("--address", help="with --engine ray: a running Ray cluster (auto, or HEAD:6379; default: start "
                                     "Ray on this machine)")


def _add_store_options(p: argparse.ArgumentParser) -> None:
    """The prompt store, API keys and their namespaces (docs/SERVING.md "Prompt store")."""
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="run embeddings on PyTorch, or on ONNX Runtime (CPU) through one graph per backbone whose "
                        "prompt tables are inputs, so hot-added prompts need no re-export (default: torch)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="with --backend onnx: int8 dynamic quantisation of the backbone (default: none)")
    p.add_argument("--onnx-threads", type=bounded(int, 0, 1024), default=0, metavar="N",
                   help="with --backend onnx: ONNX Runtime threads per graph (default: 0, one per core)")
    p.add_argument("--prompts", metavar="DIR",
                   help="prompt store: every sub-folder of DIR holding a prompt checkpoint, role pair or PEFT prefix "
                        "adapter is a prompt named after its folder, loaded on first request over the shared backbone; "
                        "added, replaced and removed while serving with PUT/DELETE /v1/prompts/NAME")
    p.add_argument("--prompt-cache-mb", type=bounded(float, 0, 1_000_000), default=ServeOptions.prompt_cache_mb,
                   metavar="MB", help="most MiB of store prompts' own tensors (prompt + head; not the backbone) kept "
                   "loaded; least recently used ones are dropped beyond it (default: %(default)s)")
    p.add_argument("--store-backbone", action="append", metavar="MODEL",
                   help="load this backbone (a name like minilm, a path or a Hub id) at start so that prompts "
                        "uploaded with PUT /v1/prompts/NAME may use it; an upload may use only a backbone the server "
                        "holds: these, the --model entries', or one a store prompt has loaded (repeatable)")
    p.add_argument("--keys", metavar="FILE",
                   help="YAML or JSON file mapping API keys to {prompts: [glob, ...], admin: bool}: each key sees and "
                        "uses only the model names matching its globs; admin keys may PUT/DELETE those prompts")
    p.add_argument("--allow-admin-without-keys", action="store_true",
                   help="with no --api-key and no --keys, allow every caller to PUT/DELETE prompts (refused by "
                        "default; for a trusted loopback server)")
    p.add_argument("--metrics-key", metavar="KEY",
                   help="a bearer key that reads GET /metrics and nothing else; once set, /metrics needs it (or a key "
                        "with metrics: true; --api-key has it) (default: $PROMCSE_METRICS_KEY; none)")
    p.add_argument("--metrics-top-models", type=bounded(int, 0, 100_000), default=ServeOptions.metrics_top_models,
                   metavar="N", help="model names with their own 'model' label in /metrics (the most requested); "
                   "the rest are counted as 'other' (default: %(default)s)")


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    """Slow or idle clients: deadlines on headers and bodies, keep-alive, open connections."""
    defaults, seconds = ServeOptions(), bounded(float, 0.1, 86_400)
    p.add_argument("--header-timeout", type=seconds, default=defaults.header_timeout_s, metavar="SECONDS",
                   help="a request's line and headers must arrive within this long of the connection opening (or "
                        "of their first byte), else 408 and the connection is closed (default: %(default)s)")
    p.add_argument("--body-timeout", type=seconds, default=defaults.body_timeout_s, metavar="SECONDS",
                   help="a request's whole body must arrive within this long of its headers, else 408 "
                        "(default: %(default)s)")
    p.add_argument("--keep-alive-timeout", type=seconds, default=defaults.keep_alive_s, metavar="SECONDS",
                   help="close a keep-alive connection idle this long between requests (default: %(default)s)")
    p.add_argument("--max-connections", type=bounded(int, 1, 1_000_000), default=defaults.max_connections,
                   help="open connections (or requests in progress) beyond which requests get 503 "
                        "(default: %(default)s)")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """Batching and authentication options of ``promcse serve``."""
    defaults = EngineConfig()
    p.add_argument("--batching", choices=["on", "off"], default="on",
                   help="on: batch texts of all requests and prompts into shared forward passes; off: one request "
                        "per forward pass (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=POSITIVE_INT, default=defaults.max_batch_tokens,
                   help="padded tokens (rows x longest row) per forward pass (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=bounded(float, 0, 10_000), default=defaults.max_wait_ms,
                   help="how long to wait for more requests before running a partial batch (default: %(default)s)")
    p.add_argument("--max-queue-tokens", type=POSITIVE_INT, default=defaults.max_queue_tokens,
                   help="tokens allowed to wait; beyond it requests get 503 + Retry-After (default: %(default)s)")
    p.add_argument("--idle-trim", choices=["on", "off"], default="on" if defaults.idle_trim else "off",
                   help="when the batching queue drains, return the allocator's free memory to the system (glibc "
                        "malloc_trim, at most once a second): keeps RSS flat under varying batch shapes "
                        "(default: %(default)s)")
    p.add_argument("--malloc-arenas", type=bounded(int, 0, 1024), default=2, metavar="N",
                   help="cap glibc's malloc arenas at N, as MALLOC_ARENA_MAX does: fewer arenas hold less idle "
                        "memory apart; with --engine ray each replica applies it in its own process (0: glibc's default of 8 per "
                        "core; default: %(default)s)")
    p.add_argument("--request-timeout", type=bounded(float, 0.001, 86_400), default=ServeOptions.request_timeout_s,
                   metavar="SECONDS", help="longest a request waits for its embeddings before a 504; the default "
                   "leaves a request at the limits (--max-texts x --max-chars) about 5x the time it takes on a 2-core "
                   "CPU (default: %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API route (default: "
                                     "$PROMCSE_API_KEY; none)")
    p.add_argument("--insecure", action="store_true",
                   help="allow --host beyond loopback without an API key")
