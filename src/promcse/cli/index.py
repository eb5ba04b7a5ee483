"""``promcse index build`` and ``promcse index search``."""

from __future__ import annotations

import argparse
from typing import Any

from promcse.cli.common import add_common
from promcse.search import AUTO_IVF_MIN, KINDS, Index


def cmd_index_build(args: argparse.Namespace) -> int:
    """``promcse index build``: embed a text file (one text per line) and save the index."""
    from promcse.data import read_sentences

    texts = read_sentences(args.input).anchor
    index = Index(args.model, kind=args.kind, nlist=args.nlist, batch_size=args.batch_size, device=args.device)
    index.add(texts, show_progress=not args.no_progress)
    out = index.save(args.output)
    print(f"indexed {len(index)} texts ({index.kind}, dim {index.dim}) in {out}")
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    """``promcse index search``: print the top hits for each query."""
    index = Index.load(args.index, device=args.device)
    for query, hits in zip(args.query, index.search(args.query, top_k=args.top_k, threshold=args.threshold)):
        print(f"query: {query}")
        for rank, hit in enumerate(hits, start=1):
            print(f"  {rank:>3}. {hit.score:.4f}  [{hit.id}] {hit.text}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``index build`` and ``index search`` to the ``promcse`` command line."""
    parser = subparsers.add_parser("index", help="build or query a semantic search index")
    sub = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    p = sub.add_parser("build", help="embed a text file (one text per line) into an index directory")
    p.add_argument("--model", required=True, help="MODEL (checkpoint dir, HF name or path, or 'minilm')")
    p.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("--output", required=True, help="index directory to write")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help=f"flat (exact FAISS), ivf (approximate), numpy (exact, no faiss); auto: ivf from "
                        f"{AUTO_IVF_MIN} texts (default: auto)")
    p.add_argument("--nlist", type=int, help="IVF lists (default: ~4*sqrt(N))")
    add_common(p, progress_help="hide the progress bar")
    p.set_defaults(func=cmd_index_build)
    p = sub.add_parser("search", help="query an index directory")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", required=True, action="append", help="query text (repeatable)")
    p.add_argument("--top-k", type=int, default=5, help="results per query (default: 5)")
    p.add_argument("--threshold", type=float, help="minimum cosine similarity")
    add_common(p, batch_size=False, progress=False)
    p.set_defaults(func=cmd_index_search)
