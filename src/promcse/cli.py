"""``promcse`` command line: a thin shell over the library's functions.

Bad input raises :class:`promcse.errors.PromcseError`; here it becomes a one-paragraph message on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from promcse.errors import PromcseError

QUICKSTART_CONFIG = "quickstart.yaml"


def _quiet_libraries() -> None:
    """Silence transformers' load-time progress bars and warnings; ours are the ones a user needs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    """Train a prompt (or a full fine-tune) from a config."""
    from promcse.config import load_config
    from promcse.loop import TrainingInterrupted
    from promcse.train import train

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
        result = train(config, output, show_progress=not args.no_progress, resume=bool(args.resume))
    except TrainingInterrupted as stop:
        print(f"promcse train: {stop}", file=sys.stderr)
        return 128 + stop.signum
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    best = "n/a" if result.best_dev is None else f"{result.best_dev:.2f} (step {result.best_step})"
    print(f"trained {result.steps} steps in {result.seconds:.0f}s; best STS-B dev {best}; checkpoint: {result.output_dir}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode one text per line into a .npy matrix."""
    import numpy as np

    from promcse.data import read_sentences
    from promcse.encode import load

    texts = read_sentences(args.input).anchor
    encoder = load(args.model, device=args.device)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize, show_progress=True)
    np.save(args.output, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one or more encoders on the STS suite."""
    from promcse.encode import load
    from promcse.sts import evaluate, format_table, parse_tasks

    tasks = parse_tasks(args.tasks)
    results = []
    for model in args.model:
        encoder = load(model, device=args.device)
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
        from promcse.plots import plot_results

        plot_results(results, [str(m) for m in args.model], args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Score the frozen MiniLM on STS-B test, train the quick-start prompt, score it again."""
    from importlib import resources

    from promcse.config import load_config
    from promcse.encode import load
    from promcse.sts import evaluate
    from promcse.train import train

    config_path = Path(str(resources.files("promcse") / "resources" / QUICKSTART_CONFIG))
    config = load_config(config_path, list(args.set or []))

    def stsb(encoder: object) -> float:
        result = evaluate(lambda t: encoder.encode(t, batch_size=128), ["stsb"], args.data_dir,  # type: ignore[attr-defined]
                          alignment_uniformity=False)
        return float(result["tasks"]["STSBenchmark"]["spearman"])

    before = stsb(load("minilm"))
    print(f"frozen all-MiniLM-L6-v2: STS-B test {before:.2f}")
    result = train(config, args.output, show_progress=not args.no_progress)
    after = stsb(load(str(result.output_dir)))
    print(f"STS-B test: frozen backbone {before:.2f} -> with trained prompt {after:.2f} ({after - before:+.2f})")
    print(f"checkpoint: {result.output_dir}  (try: promcse eval --model {result.output_dir} --tasks stsb)")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help)."""
    from promcse import __version__

    parser = argparse.ArgumentParser(
        prog="promcse",
        description="Train, evaluate and serve sentence embeddings: deep soft prompts on a frozen encoder "
        "(PromCSE) or full fine-tuning (SimCSE). MODEL is a checkpoint directory, a Hugging Face name or "
        "path, or 'minilm' (the bundled all-MiniLM-L6-v2).",
    )
    parser.add_argument("--version", action="version", version=f"promcse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from promcse.config import describe

    p = sub.add_parser("train", help="train a prompt or fine-tune", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train from a YAML config; override any key with --set section.key=value.",
                       epilog="config keys (section.key = default: meaning):\n" + describe())
    p.add_argument("--config", help="YAML config (see configs/); defaults apply to missing keys")
    p.add_argument("--train-file", help="override data.train_file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--data-dir", help="eval data dir for STS-B dev (default: $PROMCSE_DATA_DIR or bundled)")
    p.add_argument("--output", help="output directory (the checkpoint is saved here)")
    p.add_argument("--save-every", type=int, help="save a resumable training state every N steps (train.save_every)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest saved state")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="encode texts (one per line) to a .npy file")
    p.add_argument("--model", required=True, help="MODEL")
    p.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("--output", required=True, help="output .npy file")
    p.add_argument("--no-normalize", action="store_true", help="keep raw vectors (default: L2-normalised)")
    _add_common(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("eval", help="STS evaluation (SentEval protocol)")
    p.add_argument("--model", required=True, action="append", help="MODEL (repeatable, to compare)")
    p.add_argument("--tasks", default="stsb", help="comma list of sts12..sts16, stsb, sickr, stsb-dev; or 'all' (default: stsb)")
    p.add_argument("--data-dir", help="folder with tsv/original/<TASK>/*.tsv (default: $PROMCSE_DATA_DIR, else bundled STS-B)")
    p.add_argument("--text", choices=["original", "senteval"], default="original", help="untokenised text (default) or SentEval's tokenised text")
    p.add_argument("--tsv", action="append", help="extra STS-format TSV to score (repeatable)")
    p.add_argument("--cxc", help="Crisscrossed Captions STS file (official CSV + captions JSON, or PromCSE CSV)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--plot", help="write a comparison PNG here")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quickstart", help="train a prompt on bundled data and show STS-B before/after")
    p.add_argument("--output", default="runs/quickstart", help="checkpoint directory (default: runs/quickstart)")
    p.add_argument("--data-dir", help="eval data dir (default: $PROMCSE_DATA_DIR or bundled STS-B)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_quickstart)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules (serving, export, ...) add their subcommands here: functions taking the subparsers.
def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from promcse import export, search, serve

    return [search.register_cli, serve.register_cli, export.register_cli]


EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = _extra_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, map PromcseError to exit status 2."""
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PromcseError as err:
        print(f"promcse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"promcse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
