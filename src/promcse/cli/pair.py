"""``promcse pair``: a query/document role pair from checkpoint folders (:func:`promcse.models.roles.save_roles`)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_pair(args: argparse.Namespace) -> int:
    """Write the role pair and say what each role encodes with."""
    from promcse.models.roles import save_roles

    out = save_roles(args.output, query=args.query, document=args.document)
    sides = ", ".join(f"{role}: {ref or 'the frozen backbone'}" for role, ref in
                      (("query", args.query), ("document", args.document)))
    print(f"wrote role pair {out} ({sides}); load it with promcse.load, serve it with input_type query|document")
    return 0


def register(subparsers: Any) -> None:
    """Add ``pair`` to the ``promcse`` command line."""
    p = subparsers.add_parser(
        "pair", help="make a query/document role pair from checkpoints (one role may be the frozen backbone)",
        description="Copy a query checkpoint and/or a document checkpoint into one directory with roles.json. A role "
        "left out encodes with the frozen backbone of the other: a query-only pair keeps an existing document "
        "index valid.")
    p.add_argument("--query", metavar="CKPT", help="checkpoint for queries (default: the frozen backbone)")
    p.add_argument("--document", metavar="CKPT", help="checkpoint for documents (default: the frozen backbone)")
    p.add_argument("--output", required=True, help="the role pair directory to write")
    p.set_defaults(func=cmd_pair, _key_dests={"directory": "output"})
