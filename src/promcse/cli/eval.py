"""``promcse eval``: STS, and retrieval on BEIR folders (``--retrieval DIR[:split]``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from promcse.cli.common import POSITIVE_INT, add_common
from promcse.errors import PromcseError

DEFAULT_TASKS = "stsb"


def parse_retrieval(spec: str) -> tuple[str, str]:
    """``DIR[:split]`` -> (folder, split); an existing folder whose name holds ``:`` is taken whole."""
    folder, colon, split = spec.rpartition(":")
    if not colon or Path(spec).is_dir() or not split or "/" in split:
        return spec, "test"
    return folder, split


def _sts_plan(args: argparse.Namespace) -> list[str] | None:
    """The STS tasks to run: ``--tasks``, else stsb unless only ``--retrieval`` was asked for (None: no STS)."""
    from promcse.evaluation.sts import parse_tasks

    if args.tasks is not None:
        return parse_tasks(args.tasks)
    if not args.retrieval:
        return parse_tasks(DEFAULT_TASKS)
    return [] if args.tsv or args.cxc else None


def read_datasets(specs: list[str]) -> dict[str, Any]:
    """``{"<name>:<split>": BeirData}`` of every ``--retrieval`` folder, read and checked before any model loads."""
    from promcse.evaluation.beir import read_beir

    out: dict[str, Any] = {}
    for spec in specs:
        folder, split = parse_retrieval(spec)
        data = read_beir(folder, split)
        name = f"{data.name}:{split}"
        if name in out:
            raise PromcseError(f"two retrieval datasets would both be reported as '{name}'", path=folder)
        out[name] = data
    return out


def _retrieval(encoder: Any, datasets: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``{"<name>:<split>": result}`` of one encoder on every dataset (documents by ``--documents`` if given)."""
    from promcse.evaluation.retrieval import evaluate_encoder
    from promcse.models.loading import load

    documents = None if args.documents is None else load(args.documents, device=args.device, backend=args.backend)
    return {name: evaluate_encoder(encoder, data, top_k=args.top_k, cache=not args.no_cache, documents=documents,
                                   max_length=args.max_length, batch_size=args.batch_size,
                                   show_progress=not args.no_progress)
            for name, data in datasets.items()}


def _evaluate_model(model: str, tasks: list[str] | None, datasets: dict[str, Any],
                    args: argparse.Namespace) -> dict[str, Any]:
    """One model's results: STS (when asked for) and retrieval (when asked for), tables printed."""
    from promcse.evaluation.retrieval import format_retrieval_table
    from promcse.evaluation.sts import evaluate, format_table
    from promcse.models.loading import load

    encoder = load(model, device=args.device, backend=args.backend)
    result: dict[str, Any] = {"model": model}
    if tasks is not None:
        result.update(evaluate(
            lambda texts: encoder.encode(texts, batch_size=args.batch_size, show_progress=not args.no_progress),
            tasks, args.data_dir, text=args.text, tsv_files=args.tsv or (), cxc=args.cxc,
        ))
        print(format_table(result, model))
    if datasets:
        result["retrieval"] = _retrieval(encoder, datasets, args)
        print(format_retrieval_table(result["retrieval"], model))
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one or more encoders on the STS suite and/or BEIR retrieval datasets."""
    tasks = _sts_plan(args)
    if args.plot and tasks is None:
        raise PromcseError("the plot shows STS results; give STS tasks too", key="plot")
    datasets = read_datasets(args.retrieval or [])
    results = [_evaluate_model(model, tasks, datasets, args) for model in args.model]
    if args.json:
        from promcse.io.files import atomic_write_text
        from promcse.io.json_fields import dumps_strict

        payload = results[0] if len(results) == 1 else results
        atomic_write_text(args.json, dumps_strict(payload) + "\n")  # a NaN score (constant vectors) is null
        print(f"wrote {args.json}")
    if args.plot:
        from promcse.evaluation.plots import plot_results

        plot_results(results, [str(m) for m in args.model], args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``eval`` to the ``promcse`` command line."""
    p = subparsers.add_parser("eval", help="STS evaluation (SentEval protocol) and BEIR retrieval")
    p.add_argument("--model", required=True, action="append", help="MODEL (repeatable, to compare)")
    p.add_argument("--tasks", default=None, help="comma list of sts12..sts16, stsb, sickr, stsb-dev; or 'all' "
                   f"(default: {DEFAULT_TASKS}; no STS when only --retrieval is given)")
    p.add_argument("--data-dir", help="folder with tsv/original/<TASK>/*.tsv (default: $PROMCSE_DATA_DIR, else bundled STS-B)")
    p.add_argument("--text", choices=["original", "senteval"], default="original", help="untokenised text (default) or SentEval's tokenised text")
    p.add_argument("--tsv", action="append", help="extra STS-format TSV to score (repeatable)")
    p.add_argument("--cxc", help="Crisscrossed Captions STS file (official CSV + captions JSON, or PromCSE CSV)")
    p.add_argument("--retrieval", action="append", metavar="DIR[:SPLIT]",
                   help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) to score by retrieval: nDCG@10, "
                   "MRR@10, Recall@100, MAP@100 (repeatable; default split: test)")
    p.add_argument("--top-k", type=POSITIVE_INT, default=1000, help="retrieval results kept per query (default: 1000)")
    p.add_argument("--max-length", type=POSITIVE_INT, default=None,
                   help="retrieval: truncate queries and documents at N tokens (default: the model's position "
                   "limit; MTEB uses 256 for all-MiniLM-L6-v2)")
    p.add_argument("--documents", metavar="MODEL",
                   help="retrieval: encode the documents with this model instead (e.g. the frozen backbone 'minilm' "
                        "under a query-side-only prompt: its cached corpus vectors are reused, nothing is re-embedded)")
    p.add_argument("--no-cache", action="store_true",
                   help="retrieval: neither read nor write the corpus embedding cache ($PROMCSE_CACHE_DIR/embeddings)")
    p.add_argument("--json", help="write results as JSON here (retrieval: with per-query values, for "
                   "'promcse compare')")
    p.add_argument("--plot", help="write a comparison PNG here")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="torch, or onnx: ONNX Runtime on the CPU (an ONNX export, or any model exported once "
                   "into a cache folder) (default: torch)")
    add_common(p)
    p.set_defaults(func=cmd_eval)
