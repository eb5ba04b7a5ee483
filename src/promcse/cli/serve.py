"""``promcse serve``: a thin caller of :func:`promcse.serve.run_server`."""

from __future__ import annotations

import argparse
from typing import Any

from promcse.cli.common import add_common
from promcse.serve import Limits, check_server_options, load_server, parse_named, run_server


def cmd_serve(args: argparse.Namespace) -> int:
    """``promcse serve``: load models and indexes, then serve until interrupted."""
    check_server_options(port=args.port, graceful_timeout=args.graceful_timeout)  # before the slow model load
    models = parse_named(args.model, "model")
    registry, indexes = load_server(models, parse_named(args.index, "index"), device=args.device)
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars)
    stopped_by = run_server(registry, indexes, host=args.host, port=args.port, limits=limits,
                            graceful_timeout=args.graceful_timeout)
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
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    add_common(p, batch_size=False, progress=False)
    p.add_argument("--max-texts", type=int, default=Limits.max_texts, help="texts per request (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=Limits.max_chars, help="characters per text (default: %(default)s)")
    p.add_argument("--graceful-timeout", type=int, default=30, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, wait this long for requests in flight before cancelling them "
                        "(default: %(default)s)")
    p.set_defaults(func=cmd_serve)
