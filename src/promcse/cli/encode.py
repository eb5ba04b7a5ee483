"""``promcse encode``."""

from __future__ import annotations

import argparse
from typing import Any

from promcse.cli.common import add_common


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode one text per line into a .npy matrix."""
    import numpy as np

    from promcse.data import read_sentences
    from promcse.loading import load

    texts = read_sentences(args.input).anchor
    encoder = load(args.model, device=args.device)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize, show_progress=True)
    np.save(args.output, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.output}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``encode`` to the ``promcse`` command line."""
    p = subparsers.add_parser("encode", help="encode texts (one per line) to a .npy file")
    p.add_argument("--model", required=True, help="MODEL")
    p.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("--output", required=True, help="output .npy file")
    p.add_argument("--no-normalize", action="store_true", help="keep raw vectors (default: L2-normalised)")
    add_common(p)
    p.set_defaults(func=cmd_encode)
