"""``promcse mine``: hard negatives for training pairs (or sentences), mined with a model and the Index."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from promcse.cli.common import NON_NEGATIVE_INT, add_common, bounded
from promcse.errors import PromcseError

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
# MineConfig's and write_mined's names that are not an option's dest: the option they come from
KEY_DESTS = {"range_min": "range", "range_max": "range", "path": "output"}


def parse_range(text: str) -> tuple[int, int]:
    """``--range "10-50"`` -> ``(10, 50)`` (``MineConfig.range_min``, ``range_max``): 1-based inclusive ranks.

    Raises:
        PromcseError: Not ``FIRST-LAST`` integers with ``1 <= FIRST <= LAST`` (the option is named).
    """
    match = _RANGE.match(text)
    if match is None:
        raise PromcseError(f"--range {text!r}: write FIRST-LAST, two whole numbers, e.g. 10-50")
    low, high = int(match.group(1)), int(match.group(2))
    if not 1 <= low <= high:
        raise PromcseError(f"--range {text}: write FIRST-LAST with 1 <= FIRST <= LAST (ranks count from 1), e.g. 10-50")
    return low, high


def cmd_mine(args: argparse.Namespace) -> int:
    """Read the pairs (and corpus), mine, write the rows atomically and print the report."""
    from promcse.io.data import read_training_file, resolve_train_file
    from promcse.models.loading import load
    from promcse.corpus.mine import MineConfig, mine_hard_negatives
    from promcse.corpus.mine_files import check_mined_output, format_report, read_corpus, write_mined

    low, high = parse_range(args.range)
    config = MineConfig(range_min=low, range_max=high, margin=args.margin, max_score=args.max_score,
                        per_anchor=args.per_anchor, strategy=args.strategy, seed=args.seed,
                        batch_size=args.batch_size, index_kind=args.index_kind, show_progress=not args.no_progress)
    config.validate()  # option errors before any file or model is read
    source, corpus_file = resolve_train_file(args.input), args.corpus and resolve_train_file(args.corpus)
    if Path(args.output).resolve() in {Path(p).resolve() for p in (source, corpus_file) if p}:
        raise PromcseError("--output would overwrite an input file; write somewhere else", path=args.output)
    check_mined_output(args.output, [p for p in (source, corpus_file) if p])  # before any file is read
    pairs = read_training_file(source)
    corpus = read_corpus(corpus_file) if corpus_file else None
    encoder = load(args.model, device=args.device)
    result = mine_hard_negatives(encoder, pairs, corpus, config)
    out = write_mined(result, args.output)
    print(format_report(result, out))
    return 0


def register(subparsers: Any) -> None:
    """Add ``mine`` to the ``promcse`` command line."""
    from promcse.corpus.search import KINDS

    p = subparsers.add_parser(
        "mine", help="mine hard negatives for training pairs with a model and a search index",
        description="For each (sent0, sent1) row, take the anchor's corpus neighbours at ranks FIRST-LAST "
        "(not counting the anchor and its positives), drop likely false negatives (--margin or --max-score) "
        "and write sent0,sent1,hard_neg (or hard_neg_1..K). A .txt input (one sentence a line) makes each "
        "sentence its own positive (sent1 = sent0); its filters compare against a positive score of 1.")
    p.add_argument("--model", default="minilm", help="MODEL that ranks the neighbours (default: minilm)")
    p.add_argument("--input", required=True, help="pairs: .csv/.tsv/.jsonl with sent0, sent1[, hard_neg]; or .txt "
                                                  "(bundled:NAME: a packaged sample)")
    p.add_argument("--output", required=True, help="mined rows to write (.csv or .jsonl), atomically")
    p.add_argument("--corpus", help="candidate sentences: .txt, or .csv/.tsv/.jsonl with a text column (or "
                                    "sent0/sent1/hard_neg) (default: every distinct sentence of --input)")
    p.add_argument("--range", default="10-50", metavar="FIRST-LAST",
                   help="neighbour ranks kept, 1-based and inclusive, after the anchor and its positives "
                        "(default: 10-50)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--margin", type=bounded(float, 0.0, 2.0),
                      help="drop candidates scoring above positive - MARGIN (default: no filter)")
    rule.add_argument("--max-score", type=bounded(float, 0.0, 1.0),
                      help="drop candidates scoring above MAX_SCORE x positive (default: no filter)")
    p.add_argument("--per-anchor", type=bounded(int, 1, 1000), default=1,
                   help="negatives per row (K); K > 1 writes hard_neg_1..hard_neg_K; rows with fewer are "
                        "dropped (default: 1)")
    p.add_argument("--strategy", choices=("top", "random"), default="top",
                   help="top: the hardest passing candidates; random: K of them, seeded (default: top)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of --strategy random (default: 0)")
    p.add_argument("--index-kind", choices=KINDS, default="auto",
                   help="search index kind (default: auto: exact flat below 100,000 sentences, else ivf)")
    add_common(p)
    p.set_defaults(func=cmd_mine, _key_dests=KEY_DESTS)
