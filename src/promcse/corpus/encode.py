"""Streaming corpus encoding: ``promcse encode --input FILE|DIR --output DIR`` (the files: :mod:`promcse.corpus.shards`).

The input is read as a stream of rows, one shard (``shard_size`` rows) at a time, and each shard is encoded
and written ``chunk_rows`` rows at a time (:class:`promcse.corpus.shard_writer.ShardWriter`), so memory holds one
shard's ids and texts plus one chunk's tokens and vectors, neither the corpus nor a shard's vectors. Formats, by
extension (a directory: every such file under it, sorted by relative path):

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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
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
from promcse.corpus.shard_writer import ShardWriter

HEAD_BYTES = 1 << 20  # the quick fingerprint hashes the first MiB of each file
TRUNCATED = r"\d+ of \d+ texts reached the \d+-token limit"  # encode_texts' warning, given once per shard here


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
        chunk_rows: Rows tokenized and encoded at a time within a shard, rounded down to whole batches (at least
            one): bounds memory; the files are the same for every value.
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
    chunk_rows: int = 4096


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


@contextmanager
def _one_truncation_warning() -> Iterator[None]:
    """Hide encode_texts' per-call truncation warning: :func:`_length_order` gives the shard's one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRUNCATED, category=UserWarning)
        yield


def _length_order(encoder: SentenceEncoder, texts: list[str], job: EncodeJob) -> np.ndarray:
    """The shard's rows longest first by token count, ties in row order: the order one ``encode_texts`` call
    over the whole shard encodes them in. Tokenizes a chunk at a time and keeps only the counts; warns once
    if texts were truncated, as that call did."""
    limit = min(job.max_length or encoder.max_length, encoder.max_length)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for at in range(0, len(texts), job.chunk_rows):
        tokens = encoder.tokenizer(texts[at:at + job.chunk_rows], truncation=True, max_length=limit, padding=False)
        lengths[at:at + job.chunk_rows] = [len(ids) for ids in tokens["input_ids"]]
    cut = int((lengths >= limit).sum())
    if cut:
        warnings.warn(f"{cut} of {len(texts)} texts reached the {limit}-token limit and were truncated",
                      stacklevel=2)
    return np.argsort(-lengths, kind="stable")


def _encode_shard(encoder: SentenceEncoder, job: EncodeJob, manifest: dict[str, Any], index: int, start: int,
                  chunk: list[tuple[Any, str]]) -> None:
    """Encode one shard a chunk at a time into its files, then write the manifest that lists it.

    The chunks follow :func:`_length_order` and hold whole batches, so every forward pass sees the texts one
    ``encode_texts`` call over the shard would batch together, and the files are byte-identical to
    :func:`write_shard`'s of that call's vectors; only one chunk's tokens and vectors are in memory at a time.
    """
    texts = [text for _, text in chunk]
    step = max(1, job.chunk_rows // job.batch_size) * job.batch_size
    order = _length_order(encoder, texts, job)
    with ShardWriter(job.output, index, len(chunk), encoder.dim, manifest["dtype"]) as writer:
        for at in range(0, len(chunk), step):  # the rows file, in row order
            writer.add_rows([rid for rid, _ in chunk[at:at + step]], texts[at:at + step] if job.with_texts else None)
        for at in range(0, len(order), step):
            rows = order[at:at + step]
            with _one_truncation_warning():
                vectors = encode_texts(encoder, [texts[r] for r in rows], batch_size=job.batch_size,
                                       normalize=job.normalize, max_length=job.max_length)
            writer.put(rows, np.asarray(vectors))
            del vectors
        entry = writer.finish(start)
    manifest["shards"].append(entry)
    write_manifest(job.output, manifest)
    malloc_trim()  # batches of every shape leave free holes glibc keeps: hand them back once per shard


def store_shard(job: EncodeJob, manifest: dict[str, Any], index: int, start: int, vectors: Any, ids: list[Any],
                texts: list[str]) -> None:
    """Write a shard encoded whole (the Ray engine's) with :func:`write_shard`, then the manifest that lists it.
    ``encode_corpus`` streams its shards through :class:`ShardWriter` instead: the same files, byte for byte."""
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
    for key in ("shard_size", "chunk_rows", "batch_size"):
        if getattr(job, key) < 1:
            raise PromcseError(f"must be at least 1, got {getattr(job, key)}", key=key)
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
