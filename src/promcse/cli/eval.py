"""``promcse eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from promcse.cli.common import add_common


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one or more encoders on the STS suite."""
    from promcse.models.loading import load
    from promcse.evaluation.sts import evaluate, format_table, parse_tasks

    tasks = parse_tasks(args.tasks)
    results = []
    for model in args.model:
        encoder = load(model, device=args.device, backend=args.backend)
        result = evaluate(
            lambda texts: encoder.encode(texts, batch_size=args.batch_size, show_progress=not args.no_progress),
            tasks, args.data_dir, text=args.text, tsv_files=args.tsv or (), cxc=args.cxc,
        )
        result = {"model": model, **result}
        results.append(result)
        print(format_table(result, model))
    if args.json:
        payload = results[0] if len(results) == 1 else results
        Path(args.json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        from promcse.evaluation.plots import plot_results

        plot_results(results, [str(m) for m in args.model], args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``eval`` to the ``promcse`` command line."""
    p = subparsers.add_parser("eval", help="STS evaluation (SentEval protocol)")
    p.add_argument("--model", required=True, action="append", help="MODEL (repeatable, to compare)")
    p.add_argument("--tasks", default="stsb", help="comma list of sts12..sts16, stsb, sickr, stsb-dev; or 'all' (default: stsb)")
    p.add_argument("--data-dir", help="folder with tsv/original/<TASK>/*.tsv (default: $PROMCSE_DATA_DIR, else bundled STS-B)")
    p.add_argument("--text", choices=["original", "senteval"], default="original", help="untokenised text (default) or SentEval's tokenised text")
    p.add_argument("--tsv", action="append", help="extra STS-format TSV to score (repeatable)")
    p.add_argument("--cxc", help="Crisscrossed Captions STS file (official CSV + captions JSON, or PromCSE CSV)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--plot", help="write a comparison PNG here")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="torch, or onnx: ONNX Runtime on the CPU (an ONNX export, or any model exported once "
                   "into a cache folder) (default: torch)")
    add_common(p)
    p.set_defaults(func=cmd_eval)
