"""``promcse export``."""

from __future__ import annotations

import argparse
from typing import Any

from promcse.export import FORMATS, export_sentence_transformers, read_eval_results


def cmd_export(args: argparse.Namespace) -> int:
    """``promcse export``."""
    eval_results = read_eval_results(args.eval_json) if args.eval_json else None
    out = export_sentence_transformers(args.model, args.output, copy_backbone=args.copy_backbone,
                                       eval_results=eval_results)
    print(f"exported to {out}; load with SentenceTransformer({str(out)!r}, trust_remote_code=True)")
    return 0


def register(subparsers: Any) -> None:
    """Add ``export`` to the ``promcse`` command line."""
    p = subparsers.add_parser("export", help="export a model for sentence-transformers")
    p.add_argument("--format", choices=FORMATS, default="sentence-transformers", help="target (default: %(default)s)")
    p.add_argument("--model", required=True, help="MODEL (checkpoint dir, HF name or path, or 'minilm')")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--copy-backbone", action="store_true",
                   help="copy the backbone into the export (self-contained; default: reference it)")
    p.add_argument("--eval-json", help="results of 'promcse eval --json' to put in the model card")
    p.set_defaults(func=cmd_export)
