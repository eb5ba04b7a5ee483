"""``promcse encode``: texts to one ``.npy`` file, or a corpus to a resumable shard directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from promcse.cli.common import POSITIVE_INT, add_common, bounded
from promcse.errors import PromcseError


def parse_part(value: str) -> tuple[int, int]:
    """``--shard "1/4"`` -> ``(1, 4)`` (:attr:`promcse.corpus.encode.EncodeJob.part`); the index is 0-based."""
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise PromcseError(f"--shard expects i/N such as 0/4, got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise PromcseError(f"--shard {value}: need 0 <= i < N")
    return index, count


def _encode_single_file(args: argparse.Namespace) -> int:
    """``--output FILE.npy``: one text per line into one matrix (the original behaviour)."""
    import numpy as np

    from promcse.io.data import read_sentences
    from promcse.io.files import atomic_write, check_output_file
    from promcse.models.loading import load

    output = check_output_file(args.output, inputs=[args.input])  # before any work: nothing lost to a bad path
    texts = read_sentences(args.input).anchor
    encoder = load(args.model, device=args.device, backend=args.backend)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize,
                             show_progress=not args.no_progress)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would append .npy to a temporary name
            np.save(handle, vectors, allow_pickle=False)

    atomic_write(output, write)  # complete under its final name, or not there at all
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings ({vectors.dtype}) to file {output}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from promcse.corpus.shards import merge

    manifest = merge(args.merge, args.output)
    print(f"merged {len(args.merge)} part(s): {manifest['num_shards']} shards, {manifest['total_rows']} rows "
          f"({manifest['dtype']}, dim {manifest['dim']}) in directory {args.output}")
    return 0


def _encode_corpus(args: argparse.Namespace) -> int:
    from promcse.corpus.encode import EncodeJob, check_output, encode_corpus
    from promcse.models.loading import load

    if args.backend != "torch":
        raise PromcseError("--backend onnx writes one .npy file only; shard directories use the torch backend")
    if args.engine == "ray" and args.shard:
        raise PromcseError("--shard i/N splits an encode between separate jobs; --engine ray spreads one job "
                           "over its workers: leave --shard out")
    check_output(args.output, args.input)  # before the model loads
    part = parse_part(args.shard) if args.shard else (0, 1)
    job = EncodeJob(input=Path(args.input), output=Path(args.output), shard_size=args.shard_size, dtype=args.dtype,
                    normalize=not args.no_normalize, batch_size=args.batch_size, part=part,
                    text_field=args.text_field, id_field=args.id_field, full_hash=args.full_hash,
                    with_texts=not args.no_texts, show_progress=not args.no_progress)
    if args.engine == "ray":
        manifest = _encode_on_ray(args, job)
    else:
        if args.workers is not None or args.cpus_per_worker is not None or args.address:
            raise PromcseError("--workers, --cpus-per-worker and --address need --engine ray")
        manifest = encode_corpus(load(args.model, device=args.device), job, args.model)
    mine = manifest["shards"]
    print(f"wrote {len(mine)} shard(s), {sum(e['rows'] for e in mine)} of {manifest['total_rows']} rows "
          f"({manifest['dtype']}, dim {manifest['dim']}) to directory {args.output}")
    return 0


def _encode_on_ray(args: argparse.Namespace, job: Any) -> dict[str, Any]:
    """``--engine ray``: the same encode on a pool of Ray actors (promcse.corpus.ray_encode)."""
    from promcse.corpus.ray_encode import RayEncodeConfig, encode_files

    device = "cpu" if args.device == "auto" else args.device  # a worker sees only the GPUs Ray gave it
    config = RayEncodeConfig(workers=args.workers or 2, cpus_per_worker=args.cpus_per_worker or 1.0,
                             gpus_per_worker=1.0 if device == "cuda" else 0.0, device=device, address=args.address)
    return encode_files(job, args.model, config)


# Options of the shard-directory encode that a .npy output cannot honour, and when each counts as given.
_SHARD_ONLY: dict[str, Any] = {
    "--shard": lambda a: bool(a.shard), "--shard-size": lambda a: a.shard_size != 100_000,
    "--dtype": lambda a: a.dtype != "fp32", "--id-field": lambda a: a.id_field is not None,
    "--text-field": lambda a: a.text_field != "text", "--full-hash": lambda a: a.full_hash,
    "--no-texts": lambda a: a.no_texts,
}


def cmd_encode(args: argparse.Namespace) -> int:
    """Dispatch: ``--merge``, a ``.npy`` output (one file) or a shard directory."""
    if args.merge:
        if args.input or args.shard:
            raise PromcseError("--merge joins finished parts: give only the part directories and --output")
        return _merge(args)
    if not args.model or not args.input:
        raise PromcseError("encode needs --model and --input (or --merge DIR ... to join parts)")
    if str(args.output).endswith(".npy"):
        if args.engine == "ray":
            raise PromcseError("--engine ray writes a shard directory: give --output DIR, not a .npy file")
        ignored = [flag for flag, given in _SHARD_ONLY.items() if given(args)]
        if ignored:  # silently ignored options would look like they took effect
            raise PromcseError(f"{', '.join(ignored)} apply to a shard directory only: give --output DIR, or "
                               "leave them out for a .npy file")
        return _encode_single_file(args)
    return _encode_corpus(args)


def register(subparsers: Any) -> None:
    """Add ``encode`` to the ``promcse`` command line."""
    p = subparsers.add_parser(
        "encode", help="encode texts to a .npy file, or a corpus to a resumable shard directory",
        description="With --output FILE.npy: one text per line into one matrix. With --output DIR: stream a "
        ".txt/.jsonl/.parquet file or directory into fixed-size shards plus manifest.json; re-run the same "
        "command after an interruption to finish it.")
    p.add_argument("--model", help="MODEL")
    p.add_argument("--input", help="a .txt (one text per line), .jsonl or .parquet file, or a directory of them")
    p.add_argument("--output", required=True, help="output .npy file, or shard directory")
    p.add_argument("--no-normalize", action="store_true", help="keep raw vectors (default: L2-normalised)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="torch, or onnx: ONNX Runtime on the CPU (an ONNX export, or any model exported once "
                   "into a cache folder; .npy output only) (default: torch)")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=100_000, help="rows per shard (default: 100000)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="stored vector type; int8 stores a per-vector scale in shard-*.scales.npy (default: fp32)")
    p.add_argument("--text-field", default="text", help="jsonl key / parquet column of the text (default: text)")
    p.add_argument("--id-field", help="jsonl key / parquet column of the id (default: the row number)")
    p.add_argument("--shard", metavar="i/N", help="encode only shards i, i+N, ... (a job array's task i of N)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join the finished part directories into --output")
    p.add_argument("--full-hash", action="store_true",
                   help="fingerprint inputs by their full sha256 (default: size, mtime, sha256 of the first MiB)")
    p.add_argument("--no-texts", action="store_true", help="store only ids next to the vectors, not the texts")
    add_common(p)
    _add_ray_options(p)
    p.set_defaults(func=cmd_encode, _key_dests={"part": "shard", "dirs": "merge"})


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    """``--engine ray``: the shard-directory encode on a pool of Ray actors (the [ray] extra)."""
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: --workers Ray actors, one model each, same shards and manifest "
                        "(pip install 'promcse[ray]') (default: %(default)s)")
    p.add_argument("--workers", type=bounded(int, 1, 4096), help="with --engine ray: actors (default: 2)")
    p.add_argument("--cpus-per-worker", type=bounded(float, 0.01, 1024),
                   help="with --engine ray: CPUs Ray reserves per actor, also its torch threads; --device cuda "
                        "gives each actor one GPU (default: 1)")
    p.add_argument("--address", help="with --engine ray: a running Ray cluster (auto, or HEAD:6379; default: start "
                                     "Ray on this machine)")
