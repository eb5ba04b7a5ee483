"""``promcse serve``: a thin caller of :func:`promcse.launch.run_server`."""

from __future__ import annotations

import argparse
from typing import Any

from promcse.batching import EngineConfig
from promcse.cli.common import POSITIVE_INT, add_common, bounded
from promcse.launch import api_key_from, check_server_options, load_server, parse_named, run_server
from promcse.serve import Limits, ServeOptions


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """Batching, timeout and authentication options from the command line."""
    engine = None if args.batching == "off" else EngineConfig(
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue_tokens=args.max_queue_tokens)
    return ServeOptions(engine=engine, request_timeout_s=args.request_timeout, api_key=api_key_from(args.api_key),
                        insecure=args.insecure)


def cmd_serve(args: argparse.Namespace) -> int:
    """``promcse serve``: load models and indexes, then serve until interrupted."""
    options = serve_options(args)
    check_server_options(args.port, args.graceful_timeout, args.host, options.api_key, options.insecure,
                         options.engine)  # before the slow model load
    models = parse_named(args.model, "model")
    registry, indexes = load_server(models, parse_named(args.index, "index"), device=args.device)
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars)
    stopped_by = run_server(registry, indexes, host=args.host, port=args.port, limits=limits,
                            graceful_timeout=args.graceful_timeout, options=options)
    if stopped_by is not None:
        print(f"promcse serve: stopped by {stopped_by.name}", flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``promcse`` command line."""
    p = subparsers.add_parser("serve", help="HTTP API and web page: embed, similarity, search")
    p.add_argument("--model", action="append", required=True, metavar="NAME=MODEL",
                   help="model to serve (repeatable; checkpoints on one backbone share it in memory)")
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
    p.set_defaults(func=cmd_serve)


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
    p.add_argument("--request-timeout", type=bounded(float, 0.001, 86_400), default=30.0, metavar="SECONDS",
                   help="longest a request waits for its embeddings before a 504 (default: %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API route (default: "
                                     "$PROMCSE_API_KEY; none)")
    p.add_argument("--insecure", action="store_true",
                   help="allow --host beyond loopback without an API key")
