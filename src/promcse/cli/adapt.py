"""``promcse adapt``: a query prompt for a domain (:mod:`promcse.training.adapt`), from a BEIR folder's relevance
labels (``--labels DIR``) or from the corpus alone (``--corpus FILE|DIR``)."""

from __future__ import annotations

import argparse
from typing import Any


def _config(args: argparse.Namespace, corpus_only: bool) -> Any:
    from promcse.training.query_side import QueryTuneConfig

    epochs = args.epochs or (3 if corpus_only else 15)
    return QueryTuneConfig(prompt_length=args.prompt_length, lr=args.lr, epochs=epochs, batch_size=args.batch_size,
                           temperature=args.temperature, eh_weight=args.eh_weight, seed=args.seed,
                           prompt_gate=args.gate,
                           patience=0 if corpus_only else 4)


def cmd_adapt(args: argparse.Namespace) -> int:
    """Train, save the role pair, and say how it did and how to use it."""
    from promcse.training.adapt import AdaptSetup, adapt_corpus, adapt_labelled

    if not args.output and not args.pairs_out:
        raise SystemExit("promcse adapt: give --output DIR (or --pairs-out FILE)")

    setup = AdaptSetup(backbone=args.backbone, document_max_length=args.document_max_length,
                       cache=False if args.no_cache else True, show_progress=not args.no_progress)
    if args.pairs_out:
        from promcse.training.adapt import write_labelled_pairs

        if not args.labels:
            raise SystemExit("promcse adapt: --pairs-out needs --labels DIR")
        n = write_labelled_pairs(args.labels, args.pairs_out, args.split, args.negatives, setup)
        print(f"wrote {n} (query, relevant document, {args.negatives} mined negative(s)) rows to {args.pairs_out}; "
              f"train a prompt for both roles with: promcse train --set data.train_file={args.pairs_out} "
              f"--set data.max_length={args.document_max_length} --set data.dev=retrieval:{args.labels}:dev")
        return 0
    if args.labels:
        _, result = adapt_labelled(args.labels, args.output, args.split, args.dev_split, args.dev_fraction,
                                   _config(args, False), setup)
        print(f"best dev nDCG@10 {result.best_dev:.2f} at epoch {result.best_epoch} (epoch 0, the frozen backbone: "
              f"{result.history[0][1]:.2f}); {result.seconds:.0f} s")
    else:
        _, result = adapt_corpus(args.corpus, args.output, args.signal, _config(args, True), setup)
        print(f"trained {result.best_epoch} epochs on pseudo-queries from the corpus in {result.seconds:.0f} s")
    print(f"wrote query-only role pair {args.output}: queries through the new prompt, documents through the frozen "
          f"{args.backbone} (an index built with it stays valid; encode documents with --max-length "
          f"{args.document_max_length} to match). Evaluate: promcse eval --model {args.output} --retrieval DIR "
          f"--max-length {args.document_max_length}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``adapt`` to the ``promcse`` command line."""
    p = subparsers.add_parser(
        "adapt", help="train a query prompt for a domain from relevance labels or from the corpus alone",
        description="Train a deep prompt for the query side only, against the frozen backbone's vectors of the "
        "corpus (every document is a candidate negative; judged-relevant ones never are). Documents keep their "
        "frozen vectors, so an existing index stays valid. Writes a role pair (roles.json + query/): load it with "
        "promcse.load, evaluate it with promcse eval --retrieval, serve it with input_type query|document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", metavar="DIR", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    source.add_argument("--corpus", metavar="FILE|DIR", help="unlabeled documents: a BEIR folder or corpus.jsonl, "
                        "a .txt with one document a line, a .jsonl/.csv with a text field, or a folder of them")
    p.add_argument("--output", help="the role pair directory to write (required unless --pairs-out)")
    p.add_argument("--pairs-out", metavar="FILE", help="instead of training, write the labelled pairs with mined "
                   "hard negatives (relevant documents never mined) as a promcse train file (both roles trained)")
    p.add_argument("--negatives", type=int, default=1, help="mined hard negatives per pair (--pairs-out)")
    p.add_argument("--split", default="train", help="qrels split to train on (--labels)")
    p.add_argument("--dev-split", help="qrels split to select the best epoch on (default: carve --dev-fraction "
                   "of the training queries)")
    p.add_argument("--dev-fraction", type=float, default=0.2, help="share of training queries held out for dev")
    p.add_argument("--signal", default="auto", choices=["auto", "title", "sentence"],
                   help="pseudo-queries for --corpus: titles, random sentences, or both (auto)")
    p.add_argument("--backbone", default="minilm", help="the frozen backbone (the one the index was built with)")
    p.add_argument("--document-max-length", type=int, default=256, help="token limit of the documents")
    p.add_argument("--prompt-length", type=int, default=20, help="prefix length P")
    p.add_argument("--epochs", type=int, default=0, help="passes over the queries (0: 15 with labels, the best on "
                   "dev kept; 3 without)")
    p.add_argument("--batch-size", type=int, default=32, help="queries per step")
    p.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0: 1e-2)")
    p.add_argument("--temperature", type=float, default=0.05, help="softmax temperature; 0.02 was better where "
                   "queries have one or two relevant documents (SciFact), worse with dozens (NFCorpus)")
    p.add_argument("--gate", action="store_true", help="a gated prefix: starts as exactly the frozen backbone "
                   "(+0.4 dev nDCG@10 on SciFact; docs/RESULTS.md)")
    p.add_argument("--eh-weight", type=float, default=0.0, help="weight of the energy-based hinge term")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the corpus embedding cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_adapt, _key_dests={"dev_fraction": "dev_fraction", "signal": "signal"})
