"""``promcse train`` and ``promcse quickstart``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from promcse.cli.common import NON_NEGATIVE_INT, add_common
from promcse.errors import PromcseError

QUICKSTART_CONFIG = "quickstart.yaml"


def cmd_train(args: argparse.Namespace) -> int:
    """Train a prompt (or a full fine-tune) from a config."""
    from promcse.training.config import load_config
    from promcse.training.loop import TrainingInterrupted
    from promcse.training.train import train

    overrides = list(args.set or [])
    if args.train_file:
        overrides.append(f"data.train_file={args.train_file}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.data_dir:
        overrides.append(f"data.eval_data_dir={args.data_dir}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    if args.resume:
        saved = Path(args.resume) / "run_config.yaml"
        if not saved.is_file():
            raise PromcseError("not a run directory to resume (no run_config.yaml)", path=args.resume)
        config = load_config(saved, overrides)
        output = args.resume
    else:
        if not args.output:
            raise PromcseError("--output is required (or --resume DIR to continue a run)")
        config = load_config(args.config, overrides)
        output = args.output
    try:
        result = train(config, output, show_progress=not args.no_progress, resume=bool(args.resume),
                       overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        print(f"promcse train: interrupted at step {stop.step}; state saved. Resume with: promcse train --resume "
              f"{stop.run_dir}", file=sys.stderr)
        return 128 + stop.signum
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    best = "n/a" if result.best_dev is None else f"{result.best_dev:.2f} (step {result.best_step})"
    print(f"trained {result.steps} steps in {result.seconds:.0f}s; best dev {best}; checkpoint: {result.output_dir}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Score the frozen MiniLM on STS-B test, train the quick-start prompt, score it again."""
    from importlib import resources

    from promcse.training.config import load_config
    from promcse.models.loading import load
    from promcse.encoder.model import SentenceEncoder
    from promcse.evaluation.sts import score_split
    from promcse.training.train import train

    config_path = Path(str(resources.files("promcse") / "resources" / QUICKSTART_CONFIG))
    config = load_config(config_path, list(args.set or []))

    def stsb(encoder: SentenceEncoder) -> float:
        return score_split(lambda texts: encoder.encode(texts, batch_size=128), "stsb", args.data_dir)

    before = stsb(load("minilm"))
    print(f"frozen all-MiniLM-L6-v2: STS-B test {before:.2f}")
    result = train(config, args.output, show_progress=not args.no_progress, overwrite=True)  # a rerun replaces it
    after = stsb(load(str(result.output_dir)))
    print(f"STS-B test: frozen backbone {before:.2f} -> with trained prompt {after:.2f} ({after - before:+.2f})")
    print(f"checkpoint: {result.output_dir}  (try: promcse eval --model {result.output_dir} --tasks stsb)")
    return 0


def register(subparsers: Any) -> None:
    """Add ``train`` and ``quickstart`` to the ``promcse`` command line."""
    from promcse.training.config import describe

    p = subparsers.add_parser("train", help="train a prompt or fine-tune", formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Train from a YAML config; override any key with --set section.key=value.",
                              epilog="config keys (section.key = default: meaning):\n" + describe())
    p.add_argument("--config", help="YAML config (see configs/); defaults apply to missing keys")
    p.add_argument("--train-file", help="override data.train_file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--max-steps", type=NON_NEGATIVE_INT, help="override train.max_steps")
    p.add_argument("--data-dir", help="eval data dir for STS-B dev (default: $PROMCSE_DATA_DIR or bundled)")
    p.add_argument("--output", help="output directory (the checkpoint is saved here)")
    p.add_argument("--save-every", type=NON_NEGATIVE_INT, help="save a resumable training state every N steps (train.save_every)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest saved state")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run in --output (its states and checkpoint are deleted first); without it, "
                        "a directory holding another run is refused")
    add_common(p, device=False, batch_size=False, progress_help="hide the progress bar")
    p.set_defaults(func=cmd_train, _key_dests={"output_dir": "output"})

    p = subparsers.add_parser("quickstart", help="train a prompt on bundled data and show STS-B before/after")
    p.add_argument("--output", default="runs/quickstart",
                   help="checkpoint directory (default: runs/quickstart; a previous quickstart there is replaced)")
    p.add_argument("--data-dir", help="eval data dir (default: $PROMCSE_DATA_DIR or bundled STS-B)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    add_common(p, device=False, batch_size=False, progress_help="hide the progress bar")
    p.set_defaults(func=cmd_quickstart)
