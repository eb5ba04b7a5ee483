"""``promcse compare``: paired statistics of two retrieval evaluations, query by query."""

from __future__ import annotations

import argparse
from typing import Any

from promcse.cli.common import NON_NEGATIVE_INT, POSITIVE_INT


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two ``promcse eval --json`` files dataset by dataset."""
    from promcse.evaluation.compare import DEFAULT_METRICS, compare_results, format_comparison

    metrics = tuple(dict.fromkeys([*DEFAULT_METRICS, *(args.metric or [])]))
    result = compare_results(args.a, args.b, metrics, resamples=args.resamples, seed=args.seed)
    print(format_comparison(result))
    if args.json:
        from promcse.io.files import atomic_write_text
        from promcse.io.json_fields import dumps_strict

        atomic_write_text(args.json, dumps_strict(result) + "\n")
        print(f"wrote {args.json}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``compare`` to the ``promcse`` command line."""
    p = subparsers.add_parser(
        "compare", help="paired comparison of two retrieval results (per-query t-test and bootstrap)",
        description="For every dataset in both files: the mean per-query difference B - A of nDCG@10 (and of each "
        "--metric), a paired two-sided t-test, a paired bootstrap test and B's wins/ties/losses against A.")
    p.add_argument("a", metavar="A.json", help="results of model A ('promcse eval --retrieval ... --json')")
    p.add_argument("b", metavar="B.json", help="results of model B, on the same datasets and queries")
    p.add_argument("--metric", action="append", choices=("ndcg@10", "mrr@10", "recall@100", "map@100"),
                   help="also compare this metric (repeatable; nDCG@10 is always compared)")
    p.add_argument("--resamples", type=POSITIVE_INT, default=10_000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--json", help="write the comparison as JSON here")
    p.set_defaults(func=cmd_compare)
