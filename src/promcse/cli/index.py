"""``promcse index build`` and ``promcse index search``."""

from __future__ import annotations

import argparse
from typing import Any

from promcse.cli.common import POSITIVE_INT, add_common, bounded
from promcse.errors import PromcseError
from promcse.io.files import check_output_dir
from promcse.corpus.index_meta import SETTINGS
from promcse.corpus.search import AUTO_IVF_MIN, DEFAULT_TRAIN_SIZE, KINDS, Index, index_file


def _setting(name: str) -> Any:
    """The argparse type of a FAISS setting: an int in the range the index accepts (``SETTINGS``)."""
    lo, hi, _ = SETTINGS[name]
    return bounded(int, lo, hi)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The FAISS settings given on the command line (unset ones keep the library's defaults)."""
    names = ("nlist", "nprobe", "pq_m", "pq_bits", "hnsw_m", "ef_search", "rescore")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_index_build(args: argparse.Namespace) -> int:
    """``promcse index build``: embed a text file (one text per line), or index an encode's shards, and save."""
    if (args.input is None) == (args.from_vectors is None):
        raise PromcseError("index build needs exactly one of --input (texts) and --from-vectors (an encode's DIR)")
    check_output_dir(args.output, ours=index_file, inputs=[args.input or args.from_vectors], replaced=True,
                     what="promcse index")  # before any work: nothing lost to a bad path
    if args.from_vectors is not None:
        from promcse.corpus.search import build_from_vectors

        index = build_from_vectors(args.from_vectors, kind=args.kind, model_ref=args.model,
                                   train_size=args.train_size, show_progress=not args.no_progress,
                                   **_settings(args))
        source = "vectors"
    else:
        from promcse.io.data import read_sentences

        if not args.model:
            raise PromcseError("index build --input needs --model")
        texts = read_sentences(args.input).anchor
        index = Index(args.model, kind=args.kind, batch_size=args.batch_size, device=args.device, **_settings(args))
        index.add(texts, show_progress=not args.no_progress)
        source = "texts"
    out = index.save(args.output)
    print(f"indexed {len(index)} {source} ({index.kind}, dim {index.dim}) into directory {out}")
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    """``promcse index search``: print the top hits for each query."""
    index = Index.load(args.index, device=args.device)
    settings = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search), ("rescore", args.rescore))
                if v is not None}
    hits = index.search(args.query, top_k=args.top_k, threshold=args.threshold, **settings)
    for query, row in zip(args.query, hits):
        print(f"query: {query}")
        for rank, hit in enumerate(row, start=1):
            print(f"  {rank:>3}. {hit.score:.4f}  [{hit.id}] {hit.text}")
    return 0


def _search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nprobe", type=_setting("nprobe"), help="IVF lists probed per query (ivf, ivfpq; default: 16)")
    p.add_argument("--ef-search", type=_setting("ef_search"), help="HNSW candidate list per query (hnsw; default: 64)")
    p.add_argument("--rescore", type=_setting("rescore"),
                   help="candidates rescored exactly from the stored vectors (ivfpq, int8, binary; 0: off; "
                        "default: 100 for ivfpq and binary, 0 for int8)")


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="embed a text file, or index an encode's shard directory")
    p.add_argument("--model", help="MODEL (checkpoint dir, HF name or path, or 'minilm'); with --from-vectors: "
                                   "the reference to record (default: the manifest's)")
    p.add_argument("--input", help="UTF-8 text file, one text per line")
    p.add_argument("--from-vectors", metavar="DIR", help="the output directory of promcse encode --output DIR")
    p.add_argument("--output", required=True, help="index directory to write")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help=f"flat (exact), ivf, ivfpq (product quantisation), hnsw, int8 (scalar quantiser), "
                        f"binary (sign bits), numpy (exact, no faiss); auto: ivf from {AUTO_IVF_MIN} "
                        f"vectors, else flat (default: auto)")
    p.add_argument("--nlist", type=_setting("nlist"), help="IVF lists (default: ~4*sqrt(N))")
    p.add_argument("--pq-m", type=_setting("pq_m"),
                   help="ivfpq: sub-vectors, a divisor of the dimension (default: ~D/8)")
    p.add_argument("--pq-bits", type=_setting("pq_bits"), help="ivfpq: bits per sub-vector code (default: 8)")
    p.add_argument("--hnsw-m", type=bounded(int, 2, 512), help="hnsw: links per node (default: 32)")
    p.add_argument("--train-size", type=POSITIVE_INT, default=DEFAULT_TRAIN_SIZE,
                   help=f"--from-vectors: vectors sampled to train ivf/ivfpq/int8 (default: {DEFAULT_TRAIN_SIZE})")
    _search_options(p)
    add_common(p, progress_help="hide the progress bar")
    p.set_defaults(func=cmd_index_build)


def register(subparsers: Any) -> None:
    """Add ``index build`` and ``index search`` to the ``promcse`` command line."""
    parser = subparsers.add_parser("index", help="build or query a semantic search index")
    sub = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    _add_build(sub)
    p = sub.add_parser("search", help="query an index directory")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", required=True, action="append", help="query text (repeatable)")
    p.add_argument("--top-k", type=bounded(int, 1, 100_000), default=5, help="results per query (default: 5)")
    p.add_argument("--threshold", type=bounded(float, -1.0, 1.0), help="minimum cosine similarity")
    _search_options(p)
    add_common(p, batch_size=False, progress=False)
    p.set_defaults(func=cmd_index_search)
