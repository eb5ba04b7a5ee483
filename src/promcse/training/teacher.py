"""The teacher of a distillation run: its embeddings of every training text, computed once and cached.

A teacher is any model :func:`promcse.load` reads (a promcse checkpoint, ``minilm``, a Hugging Face or
sentence-transformers directory such as all-mpnet-base-v2). Before the first step its unit-length
embeddings of the run's distinct texts are computed (with a progress bar) and stored as
``<key>.npy`` + ``<key>.json`` in the cache directory; ``key`` is a sha256 of the teacher's identity (its
resolved reference and, for a directory, every file's name, size and modification time) and the texts, so
another seed or another run on the same data reuses them and any change recomputes. A multi-source run
(``data.sources``) keeps one cache per source, so adding a source to a run embeds only the new file's texts.
The loop then looks up the rows of each batch: the teacher never runs during training.

The cache directory is checked before the teacher loads (:func:`check_cache_dir`: not a file, not under one,
writable when vectors are to be written), and a record is read strictly (:func:`read_record`); errors name the
setting ``loss.distill_cache``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promcse.errors import PromcseError
from promcse.io.files import atomic_write, atomic_write_text, check_output_dir, sha256_file
from promcse.io.jsonl import parse_json
from promcse.io.schema import load_array, read_regular_file
from promcse.models.loading import load, reference_key

FORMAT = "promcse-teacher-cache"
VERSION = 1
CACHE_KEY = "loss.distill_cache"  # the setting that names the cache directory, named in its errors
MAX_RECORD_BYTES = 2**20  # a record is a few hundred bytes


@dataclass(frozen=True)
class TeacherCache:
    """Teacher embeddings of a run's texts.

    Attributes:
        reference: The teacher's model reference, as configured.
        rows: Text to row of ``vectors``.
        vectors: ``(N, D')`` float32 unit rows.
    """

    reference: str
    rows: dict[str, int]
    vectors: torch.Tensor

    @property
    def dim(self) -> int:
        """The teacher's embedding dimension D'."""
        return int(self.vectors.shape[1])

    def views(self, views: list[list[str]]) -> list[torch.Tensor]:
        """The teacher's embeddings of each view's texts, ``(B, D')`` per view."""
        return [self.vectors[torch.tensor([self.rows[text] for text in view])] for view in views]


def teacher_identity(reference: str) -> list[object]:
    """What the cache key depends on: the resolved reference and, for a directory, its files' stats."""
    key = reference_key(reference)
    path = Path(key)
    if not path.exists():
        return [key]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(p, p.stat()) for p in files]
    return [key] + [[str(p.relative_to(path) if path.is_dir() else p.name), st.st_size, st.st_mtime_ns]
                    for p, st in stats]


def cache_key(reference: str, texts: list[str]) -> str:
    """Hex sha256 of the teacher's identity and the texts (in order)."""
    digest = hashlib.sha256(json.dumps(teacher_identity(reference)).encode("utf-8"))
    for text in texts:
        digest.update(text.encode("utf-8") + b"\n")
    return digest.hexdigest()


def check_cache_dir(directory: str | Path, writable: bool, label: str = CACHE_KEY) -> Path:
    """Refuse, before the teacher loads, a cache directory that is a file, lies under one, or (``writable``,
    when vectors are to be written) cannot be written in.

    Raises:
        PromcseError: Naming the directory and ``label`` (the setting that gave it).
    """
    where = Path(directory)
    if os.path.lexists(where) and not where.is_dir():
        raise PromcseError("exists and is not a directory: the teacher cache is a directory of .npy/.json pairs",
                           path=where, key=label)
    if writable:
        try:
            check_output_dir(where, ours=lambda name: True, what="teacher cache directory", label=label)
        except PromcseError as err:  # its write probe names no key: name the setting that gave the directory
            raise PromcseError(err.message, path=err.path, key=err.key or label) from None
    return where


def read_record(path: Path) -> dict[str, Any]:
    """A cache record (``<key>.json``), strictly: a regular UTF-8 file, one JSON object, this format and version.

    Raises:
        PromcseError: Naming the record (and the key at fault).
    """
    raw = read_regular_file(path, MAX_RECORD_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PromcseError("not UTF-8 text; delete it to recompute", path=path) from None
    record = parse_json(text, path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise PromcseError("not a promcse teacher cache record; delete it to recompute", path=path)
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PromcseError(f"expected a positive int, got {json.dumps(version)[:40]}", path=path, key="version")
    if version > VERSION:
        raise PromcseError("teacher cache written by a newer promcse; upgrade or delete it", path=path, key="version")
    for name, kind in (("key", str), ("rows", int), ("sha256", str)):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise PromcseError(f"expected {kind.__name__}, got {json.dumps(value)[:40]}; delete it to recompute",
                               path=path, key=name)
    return record


def _read_cached(directory: Path, key: str, count: int) -> np.ndarray | None:
    """The cached vectors for ``key``, or None when absent; a damaged cache is named, never used."""
    meta_path, npy_path = directory / f"{key[:32]}.json", directory / f"{key[:32]}.npy"
    if not os.path.lexists(meta_path):
        return None
    meta = read_record(meta_path)
    if meta["key"] != key or meta["rows"] != count or not npy_path.is_file() \
            or meta["sha256"] != sha256_file(npy_path):
        raise PromcseError("teacher cache does not match its record (a changed or partial file); delete it to "
                           "recompute", path=npy_path)
    vectors = load_array(npy_path)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != count \
            or not np.isfinite(vectors).all():
        raise PromcseError("teacher cache holds no finite float32 (rows, dim) array; delete it", path=npy_path)
    return vectors


def _write_cache(directory: Path, key: str, reference: str, vectors: np.ndarray) -> None:
    """Vectors first, then the record naming their checksum (so a record always describes whole vectors)."""
    npy_path = directory / f"{key[:32]}.npy"

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle, not a path: np.save would append ".npy" to the temporary name
            np.save(handle, vectors, allow_pickle=False)

    atomic_write(npy_path, save)
    meta = {"format": FORMAT, "version": VERSION, "key": key, "teacher": reference, "rows": int(vectors.shape[0]),
            "dim": int(vectors.shape[1]), "sha256": sha256_file(npy_path)}
    atomic_write_text(directory / f"{key[:32]}.json", json.dumps(meta, indent=2) + "\n")


def build_teacher_cache(reference: str, texts: list[str], directory: str | Path, device: str = "auto",
                        batch_size: int = 64, show_progress: bool = True, label: str = CACHE_KEY) -> TeacherCache:
    """Embeddings of the distinct ``texts`` by the teacher ``reference``, from the cache or computed now.

    Args:
        label: The setting that names ``directory``, for errors (``loss.distill_cache``).

    Raises:
        PromcseError: The teacher cannot be loaded, the cache is damaged, or ``directory`` is a file, lies
            under one or (when the vectors are to be computed) is not writable: refused before the teacher loads.
    """
    distinct = list(dict.fromkeys(texts))
    key = cache_key(reference, distinct)
    where = check_cache_dir(directory, writable=False, label=label)
    vectors = _read_cached(where, key, len(distinct))
    if vectors is None:
        check_cache_dir(where, writable=True, label=label)
        model = load(reference, device=device)
        if show_progress:
            print(f"teacher {reference}: embedding {len(distinct):,} distinct training texts (cached in {where})")
        vectors = np.ascontiguousarray(model.encode(distinct, batch_size=batch_size, normalize=True,
                                                    show_progress=show_progress), dtype=np.float32)
        del model
        os.makedirs(where, exist_ok=True)
        _write_cache(where, key, reference, vectors)
    return TeacherCache(reference, {text: i for i, text in enumerate(distinct)}, torch.from_numpy(vectors))


def build_source_caches(reference: str, sources: Sequence[list[str]], directory: str | Path, device: str = "auto",
                        batch_size: int = 64, show_progress: bool = True, label: str = CACHE_KEY) -> TeacherCache:
    """One cache per source (each keyed by that source's texts alone), merged into one lookup.

    A text found in several sources keeps its first source's row (the teacher's vector of it is the same).
    """
    parts = [build_teacher_cache(reference, texts, directory, device=device, batch_size=batch_size,
                                 show_progress=show_progress, label=label) for texts in sources]
    if len(parts) == 1:
        return parts[0]
    rows: dict[str, int] = {}
    offset = 0
    for part in parts:
        for text, row in part.rows.items():
            rows.setdefault(text, offset + row)
        offset += part.vectors.shape[0]
    return TeacherCache(reference, rows, torch.cat([part.vectors for part in parts]))
