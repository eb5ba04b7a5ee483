"""``promcse push DIR org/name``: upload a model folder to the Hugging Face Hub
(:func:`promcse.models.hub.push_to_hub`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_push(args: argparse.Namespace) -> int:
    """Check the folder loads, write its model card if it has none, create the repository and upload."""
    from promcse.models.hub import portability_warning, push_to_hub
    from promcse.models.model_card import eval_results, read_results

    results = read_results(args.eval_json) if args.eval_json else None
    if results is not None:
        eval_results(results, args.eval_json)  # a bad file stops here, named, before the model loads
    card = {"license": args.license, "datasets": args.dataset or None, "results": results}
    warning = portability_warning(args.directory)
    if warning:
        print(f"promcse push: warning: {warning}", file=sys.stderr)
    info = push_to_hub(args.directory, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                       commit_message=args.commit_message, endpoint=args.endpoint, card_options=card)
    url = getattr(info, "commit_url", None) or args.repo_id
    print(f"pushed {args.directory} to {args.repo_id} ({url}); load it with promcse.load({args.repo_id!r})")
    return 0


def register(subparsers: Any) -> None:
    """Add ``push`` to the ``promcse`` command line."""
    p = subparsers.add_parser(
        "push", help="upload a model folder to the Hugging Face Hub",
        description="Upload a promcse checkpoint, role pair or PEFT prefix adapter folder to the Hugging Face Hub "
        "repository REPO_ID (created if needed), after checking that it loads. A README.md model card (metadata "
        "and evaluation results) is written into the folder first when it has none. Training states, hidden files "
        "and TensorBoard logs are not uploaded. Load it back with promcse.load('org/name').")
    p.add_argument("directory", metavar="DIR", help="the model folder to upload")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, owner/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the stored login)")
    p.add_argument("--revision", help="branch to push to (created if needed; default: main)")
    p.add_argument("--commit-message", help="commit message (default: 'Upload promcse model')")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--license", help="card: Hub license id (default: the backbone's when known, else none)")
    p.add_argument("--dataset", action="append", metavar="HUB_ID", help="card: a training dataset's Hub id "
                   "(repeatable)")
    p.add_argument("--eval-json", help="card: one model's results of 'promcse eval --json' (default: the folder's "
                   "results.json, if any)")
    p.set_defaults(func=cmd_push, _key_dests={"eval_results": "eval_json"})
