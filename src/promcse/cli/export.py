"""``promcse export``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError
from promcse.export.peft import FORMAT as PEFT
from promcse.export.peft import export_peft
from promcse.export.sentence_transformers import FORMATS, export_sentence_transformers, read_eval_results

# export_onnx's and export_encoders' names for the models: the prompts given with --also (after --model)
KEY_DESTS = {"models": "also", "names": "also", "encoders": "also"}


def parse_models(models: Sequence[str]) -> list[tuple[str, str]]:
    """``--model``/``--also`` ``MODEL`` or ``NAME=MODEL`` -> (name, reference) pairs for
    :func:`promcse.export.onnx.export_onnx`; a bare model is named after its last path part.

    Raises:
        PromcseError: An empty name or model, or two prompts of the same name.
    """
    named: list[tuple[str, str]] = []
    for value in models:
        name, sep, ref = value.partition("=")
        if not sep or Path(value).exists():
            name, ref = Path(value.rstrip("/")).name or value, value
        if not name or not ref:
            raise PromcseError(f"expected MODEL or NAME=MODEL, got '{value}'", key="also")
        named.append((name, ref))
    names = [name for name, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PromcseError(f"two prompts named {', '.join(duplicates)}: name them with NAME=MODEL", key="also")
    return named


def cmd_export(args: argparse.Namespace) -> int:
    """``promcse export``."""
    if args.format == "onnx":
        return _export_onnx(args)
    if args.also or args.quantize != "none":
        raise PromcseError("--also and --quantize apply to --format onnx only", key="format")
    if args.format == PEFT:
        return _export_peft(args)
    if args.base_model:
        raise PromcseError("--base-model applies to --format peft only", key="format")
    eval_results = read_eval_results(args.eval_json) if args.eval_json else None
    out = export_sentence_transformers(args.model, args.output, copy_backbone=args.copy_backbone,
                                       eval_results=eval_results)
    print(f"exported to {out}; load with SentenceTransformer({str(out)!r}, trust_remote_code=True)")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    """``promcse export --format onnx``: one graph for --model and every --also prompt."""
    from promcse.export.onnx import export_onnx

    out = export_onnx(parse_models([args.model, *(args.also or [])]), args.output, quantize=args.quantize)
    print(f"exported to {out}; load with promcse.load({str(out)!r}, backend='onnx') or --backend onnx")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    """``promcse export --format peft``: the prompt as a PEFT prefix-tuning adapter."""
    if args.copy_backbone or args.eval_json:
        raise PromcseError("--copy-backbone and --eval-json apply to --format sentence-transformers only",
                           key="format")
    out = export_peft(args.model, args.output, base_model=args.base_model)
    print(f"exported to {out}; load with PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), {str(out)!r}) "
          f"(BASE: base_model_name_or_path in adapter_config.json) and mean-pool, or promcse.load({str(out)!r})")
    return 0


def register(subparsers: Any) -> None:
    """Add ``export`` to the ``promcse`` command line."""
    p = subparsers.add_parser("export", help="export a model for sentence-transformers, ONNX Runtime or PEFT")
    p.add_argument("--format", choices=FORMATS + ("onnx", PEFT), default="sentence-transformers",
                   help="target (default: %(default)s)")
    p.add_argument("--model", required=True, help="MODEL (checkpoint dir, HF name or path, or 'minilm'); "
                   "with --format onnx also NAME=MODEL")
    p.add_argument("--also", action="append", metavar="[NAME=]MODEL",
                   help="onnx: another prompt over the same backbone, in the same graph (repeatable)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="onnx: int8 dynamic quantisation of the weights (default: %(default)s, fp32)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--copy-backbone", action="store_true",
                   help="copy the backbone into the export (self-contained; default: reference it)")
    p.add_argument("--eval-json", help="results of 'promcse eval --json' to put in the model card")
    p.add_argument("--base-model", help="peft: base_model_name_or_path to record (default: the backbone's local "
                   "path, or its hub name), e.g. a hub name for an adapter to share")
    p.set_defaults(func=cmd_export, _key_dests=KEY_DESTS)
