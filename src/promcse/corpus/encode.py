"""Streaming corpus encoding: ``promcse encode --input FILE|DIR --output DIR`` (the files: :mod:`promcse.corpus.shards`).

The input is read as a stream of rows, one shard (``shard_size`` rows) at a time, so memory is bounded by
the shard size, not the corpus. Formats, by extension (a directory: every such file under it, sorted by
relative path):

- ``.txt``: one text per line (strict UTF-8, BOM and CRLF accepted, surrounding whitespace stripped);
- ``.jsonl``: one JSON object per line, the text in ``text_field``, an optional id in ``id_field``
  (blank lines are skipped);
- ``.parquet``: columns ``text_field`` (and ``id_field``), read in record batches; needs ``pyarrow``
  (``pip install 'promcse[parquet]'``); errors name the row as the line.

Ids are the ``id_field`` values, else the row's position in the whole corpus (0-based). An empty text, a
line that is not JSON, or a missing field is a :class:`~promcse.errors.PromcseError` naming file and line.

Resuming: a re-run with the same settings skips every shard the manifest lists whose checksums match,
and re-encodes the rest (encoding is deterministic, so the result is byte-identical to an uninterrupted
run). With ``part=(i, N)`` only shards ``i, i+N, i+2N, ...`` are encoded (every part still reads the
whole stream, to know where its shards start); :func:`promcse.corpus.shards.merge` joins the parts.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from promcse.io.allocator import malloc_trim
from promcse.encoder.encode import encode_texts
from promcse.errors import PromcseError
from promcse.io.files import check_output_dir
from promcse.io.corpus_files import corpus_files, iter_corpus
from promcse.models.loading import reference_key
from promcse.encoder.model import SentenceEncoder
from promcse.corpus.shards import (FORMAT, FORMAT_VERSION, MANIFEST, SAME_RUN, canonical_dtype, owned_name, read_manifest,
                            verify_shard, write_manifest, write_shard)

HEAD_BYTES = 1 << 20  # the quick fingerprint hashes the first MiB of each file


@dataclass(frozen=True)
class EncodeJob:
    """What to encode and how (``promcse encode``'s options).

    Attributes:
        input: A ``.txt``/``.jsonl``/``.parquet`` file, or a directory of them.
        output: The shard directory (created; resumed when it holds a manifest of the same run).
        shard_size: Rows per shard (the last one may be shorter).
        dtype: Stored vector type: ``float32``, ``float16`` or ``int8`` (per-vector scales).
        normalize: L2-normalise the vectors.
        batch_size: Texts per forward pass.
        part: ``(i, N)``: encode only shards ``i, i+N, ...``.
        text_field: The text's key (jsonl) or column (parquet).
        id_field: The id's key or column (default: the row number).
        full_hash: Fingerprint each input file by its full sha256 (default: size, mtime and the first MiB).
        with_texts: Store each row's text next to its id (for ``index build --from-vectors``).
        max_length: Truncate at this many tokens.
        show_progress: Show a tqdm bar over rows.
    """

    input: Path
    output: Path
    shard_size: int = 100_000
    dtype: str = "float32"
    normalize: bool = True
    batch_size: int = 64
    part: tuple[int, int] = (0, 1)
    text_field: str = "text"
    id_field: str | None = None
    full_hash: bool = False
    with_texts: bool = True
    max_length: int | None = None
    show_progress: bool = False


def _file_hash(path: Path, full: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if full:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(handle.read(HEAD_BYTES))
    return digest.hexdigest()


def fingerprint(path: str | Path, *, full: bool = False, text_field: str = "text",
                id_field: str | None = None) -> dict[str, Any]:
    """What identifies the input: per file its name (relative to a directory), size, mtime and sha256
    (of the first MiB, or of all of it with ``full``), plus the fields read. Absolute paths are left out,
    so parts run on machines that mount the corpus elsewhere still agree."""
    root = Path(path)
    files = corpus_files(root)
    entries = [{"name": (f.relative_to(root).as_posix() if root.is_dir() else f.name), "size": f.stat().st_size,
                "mtime_ns": f.stat().st_mtime_ns, "sha256": _file_hash(f, full)} for f in files]
    return {"files": entries, "hash": "full" if full else "first MiB", "text_field": text_field,
            "id_field": id_field}


def new_manifest(job: EncodeJob, model_ref: str, dim: int, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a run that has encoded nothing yet; ``source`` replaces the input's :func:`fingerprint`
    (an input that is not files, e.g. a Ray dataset)."""
    index, count = job.part
    if source is None:
        source = fingerprint(job.input, full=job.full_hash, text_field=job.text_field, id_field=job.id_field)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": reference_key(model_ref), "dim": dim,
            "dtype": canonical_dtype(job.dtype), "normalize": job.normalize, "shard_size": job.shard_size,
            "with_texts": job.with_texts, "input": source,
            "part": None if count == 1 else {"index": index, "count": count},
            "complete": False, "total_rows": None, "num_shards": None, "shards": []}


def _remove_temporaries(out: Path) -> None:
    """Drop what a killed writer left half-written (``atomic_write``'s temporary names)."""
    for path in out.iterdir():
        if path.name.startswith((".shard-", f".{MANIFEST}.")) and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def check_output(output: str | Path, source: str | Path) -> Path:
    """Refuse, before any model loads, a shard directory that cannot be written, is a file, holds other files,
    holds the input or lies inside an input directory (see :func:`promcse.io.files.check_output_dir`)."""
    if Path(output).exists() and not Path(output).is_dir():
        raise PromcseError("must be a directory (or end in .npy for one file)", path=output, key="output")
    return check_output_dir(output, ours=owned_name, inputs=[source], scanned=[source], what="vector directory")


def resume_state(job: EncodeJob, model_ref: str, dim: int,
                 source: dict[str, Any] | None = None) -> tuple[dict[str, Any], set[int]]:
    """The manifest to continue and the shards already done (listed and verified by checksum); ``source`` as
    in :func:`new_manifest`.

    Raises:
        PromcseError: The directory holds an encode with other settings or of another input.
    """
    out = check_output(job.output, job.input)
    out.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out)
    fresh = new_manifest(job, model_ref, dim, source)
    if not (out / MANIFEST).exists():
        return fresh, set()
    existing = read_manifest(out)
    differ = [k for k in SAME_RUN + ("part",) if existing.get(k) != fresh.get(k)]
    if differ:
        raise PromcseError(f"holds an encode with other settings ({', '.join(differ)} differ): use another "
                           "directory, or delete it to start over", path=out, key="output")
    kept = [entry for entry in existing["shards"] if verify_shard(out, entry)]
    if len(kept) < len(existing["shards"]):
        existing["complete"] = False  # a listed shard failed its checksum: encode it again
    existing["shards"] = kept
    return existing, {entry["index"] for entry in kept}


def _encode_shard(encoder: SentenceEncoder, job: EncodeJob, manifest: dict[str, Any], index: int, start: int,
                  chunk: list[tuple[Any, str]]) -> None:
    """Encode one shard, write its files, then the manifest that lists it."""
    texts = [text for _, text in chunk]
    vectors = encode_texts(encoder, texts, batch_size=job.batch_size, normalize=job.normalize,
                           max_length=job.max_length)
    store_shard(job, manifest, index, start, vectors, [rid for rid, _ in chunk], texts)
    del vectors
    malloc_trim()  # batches of every shape leave free holes glibc keeps: hand them back once per shard


def store_shard(job: EncodeJob, manifest: dict[str, Any], index: int, start: int, vectors: Any, ids: list[Any],
                texts: list[str]) -> None:
    """Write an encoded shard's files, then the manifest that lists it (every engine writes through here)."""
    entry = write_shard(job.output, index, start, vectors, ids, texts if job.with_texts else None, manifest["dtype"])
    manifest["shards"].append(entry)
    write_manifest(job.output, manifest)


def finish_manifest(job: EncodeJob, manifest: dict[str, Any], total_rows: int, num_shards: int) -> dict[str, Any]:
    """Mark the encode complete (``total_rows`` rows in ``num_shards`` shards) and write the manifest.

    Raises:
        PromcseError: The input held no rows.
    """
    if total_rows == 0:
        raise PromcseError("no texts in the input", path=job.input)
    manifest.update(complete=True, total_rows=total_rows, num_shards=num_shards)
    write_manifest(job.output, manifest)
    return manifest


def encode_corpus(encoder: SentenceEncoder, job: EncodeJob, model_ref: str) -> dict[str, Any]:
    """Encode ``job.input`` into ``job.output`` shard by shard (resuming); returns the final manifest.

    Args:
        encoder: The loaded encoder.
        job: Input, output and settings.
        model_ref: The reference ``encoder`` was loaded from (recorded in the manifest).

    Raises:
        PromcseError: Bad rows (file and line named), an empty corpus, or an output of another run.
    """
    if job.shard_size < 1:
        raise PromcseError(f"must be at least 1, got {job.shard_size}", key="shard_size")
    manifest, done = resume_state(job, model_ref, encoder.dim)
    if manifest["complete"]:
        return manifest
    mine, count = job.part
    rows = iter_corpus(job.input, job.text_field, job.id_field)
    index = start = 0
    with tqdm(desc="encode", unit="rows", disable=not job.show_progress) as bar:
        while chunk := list(islice(rows, job.shard_size)):
            if index % count == mine and index not in done:
                _encode_shard(encoder, job, manifest, index, start, chunk)
            bar.update(len(chunk))
            start, index = start + len(chunk), index + 1
    return finish_manifest(job, manifest, start, index)
