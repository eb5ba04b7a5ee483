"""Canary vectors: a checkpoint's own embeddings of a few fixed sentences, written at save time, checked on load.

:func:`promcse.models.checkpoint.save_checkpoint` writes ``canary.json`` beside the weights::

    {"format": "promcse-canary", "format_version": 1, "tolerance": 0.0001,
     "texts": ["A man is playing a guitar.", ...], "vectors": [[0.0123, ...], ...]}

``vectors`` are the encoder's raw pooled vectors of ``texts`` (eval mode, before any normalisation, float32 written
with 9 significant digits, which round-trips float32 exactly). :func:`promcse.models.checkpoint.load_checkpoint`
encodes the stored ``texts`` again, in one batch, once the encoder is fully built, and refuses the checkpoint when
any component differs by more than ``tolerance * max(1, max|v|)`` (``v``: the stored vectors). The vectors are
computed on whatever device the backbone is on. The scale keeps the check meaningful for backbones whose raw vectors
are large, and leaves room for the float32 rounding differences between devices and kernels (a save on CUDA checked
on CPU, other thread counts; expected around 1e-6 relative, measured on CPU only so far); a different backbone of the
same shape, a damaged or edited prompt file or config, or code that changed what a checkpoint computes all differ by
far more. The stored texts are used, not :data:`CANARY_TEXTS`, so the constant can change without invalidating older
checkpoints. A checkpoint without ``canary.json`` (written before canaries existed) still loads, with one warning per
process and checkpoint folder.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from promcse.encoder.encode import encode_texts
from promcse.encoder.model import SentenceEncoder
from promcse.errors import PromcseError
from promcse.io.files import atomic_write_text
from promcse.io.schema import read_versioned

CANARY_FILE = "canary.json"
FORMAT = "promcse-canary"
FORMAT_VERSION = 1
TOLERANCE = 1e-4  # absolute, scaled by max(1, max|v|) of the stored vectors
MAX_TEXTS = 64
KEYS = ("format", "format_version", "tolerance", "texts", "vectors")
CANARY_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar.",
    "Two children are running in the park.",
    "The old woman was reading a book near the water.",
    "A dog is sleeping on the beach in the sun.",
    "People are eating food in the kitchen.",
)

_warned: set[str] = set()  # checkpoint folders already warned about (no canary.json), once per process
_warned_lock = threading.Lock()  # the registry may load models from several threads


def compute_canaries(encoder: SentenceEncoder, texts: tuple[str, ...] | list[str] = CANARY_TEXTS) -> np.ndarray:
    """The encoder's raw (unnormalised) float32 vectors of ``texts``, (len(texts), dim), in one batch.

    The encoder runs in eval mode (no dropout; a train-only head is skipped, as in ``encode``) under
    ``torch.inference_mode``, on the device it is on; every submodule's train/eval flag is restored afterwards,
    so a save in the middle of training leaves training as it was.
    """
    flags = [(module, module.training) for module in encoder.modules()]
    try:
        vectors = encode_texts(encoder, list(texts), batch_size=max(1, len(texts)), normalize=False)
    finally:
        for module, flag in flags:
            module.training = flag
    return np.asarray(vectors, dtype=np.float32)


def canary_text(texts: list[str], vectors: np.ndarray, tolerance: float = TOLERANCE) -> str:
    """``canary.json``'s text: the header keys, then one line per vector (readable, and small in diffs)."""
    head = {"format": FORMAT, "format_version": FORMAT_VERSION, "tolerance": tolerance, "texts": texts}
    lines = [f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}," for key, value in head.items()]
    rows = [json.dumps([float(f"{x:.9g}") for x in row.tolist()]) for row in np.asarray(vectors, dtype=np.float32)]
    body = ",\n    ".join(rows)
    return "{\n" + "\n".join(lines) + '\n  "vectors": [\n    ' + body + "\n  ]\n}\n"


def write_canaries(encoder: SentenceEncoder, directory: str | Path) -> Path:
    """Compute the encoder's canary vectors of :data:`CANARY_TEXTS` and write ``directory/canary.json`` atomically."""
    path = Path(directory) / CANARY_FILE
    texts = list(CANARY_TEXTS)
    atomic_write_text(path, canary_text(texts, compute_canaries(encoder, texts)))
    return path


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_texts(data: dict[str, Any], path: Path) -> list[str]:
    texts = data.get("texts")
    if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_TEXTS:
        raise PromcseError(f"expected a list of 1..{MAX_TEXTS} texts, got {json.dumps(texts)[:40]}", path=path,
                           key="texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise PromcseError(f"expected a non-empty string, got {json.dumps(text)[:40]}", path=path,
                               key=f"texts[{i}]")
    return texts


def _read_vectors(data: dict[str, Any], path: Path, rows: int, dim: int) -> np.ndarray:
    vectors = data.get("vectors")
    if not isinstance(vectors, list) or len(vectors) != rows:
        got = f"{len(vectors)} vectors" if isinstance(vectors, list) else json.dumps(vectors)[:40]
        raise PromcseError(f"expected {rows} vectors (one per text), got {got}", path=path, key="vectors")
    for i, row in enumerate(vectors):
        if not isinstance(row, list) or len(row) != dim:
            got = f"{len(row)} numbers" if isinstance(row, list) else json.dumps(row)[:40]
            raise PromcseError(f"expected {dim} numbers (the encoder's dimension), got {got}", path=path,
                               key=f"vectors[{i}]")
        bad = [x for x in row if not _finite_number(x)]
        if bad:
            raise PromcseError(f"expected finite numbers, got {json.dumps(bad[0])[:40]}", path=path,
                               key=f"vectors[{i}]")
    return np.asarray(vectors, dtype=np.float64)


def read_canaries(path: str | Path, dim: int) -> tuple[list[str], np.ndarray, float]:
    """Read ``canary.json`` strictly: (texts, vectors as (len(texts), ``dim``) float64, tolerance).

    Raises:
        PromcseError: Naming the file and key: not UTF-8 JSON (NaN and Infinity are not JSON), another format or a
            newer version, unknown or missing keys, wrong types, non-finite numbers, or vectors whose shape does
            not fit the texts and ``dim``.
    """
    path = Path(path)
    data = read_versioned(path, FORMAT, FORMAT_VERSION, "canary file")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise PromcseError(f"unknown key(s) {', '.join(unknown)}; a canary file has {', '.join(KEYS)}", path=path,
                           key=unknown[0])
    tolerance = data.get("tolerance")
    if not _finite_number(tolerance) or not 0 < tolerance <= 1:
        raise PromcseError(f"expected a number in (0, 1], got {json.dumps(tolerance)[:40]}", path=path,
                           key="tolerance")
    texts = _read_texts(data, path)
    return texts, _read_vectors(data, path, len(texts), dim), float(tolerance)


def _warn_missing(directory: Path) -> None:
    """Warn once per process and folder that a checkpoint carries no canary vectors."""
    key = os.path.realpath(directory)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"{directory} has no {CANARY_FILE} (saved before promcse recorded canary vectors), so it loads "
                  "unchecked; promcse.models.canary.write_canaries(encoder, folder) adds them", UserWarning,
                  stacklevel=4)


def check_canaries(encoder: SentenceEncoder, directory: str | Path,
                   files: str = "prompt.safetensors or config.json") -> bool:
    """Recompute the stored canary texts' vectors and compare them with ``directory/canary.json``.

    Returns True when checked, False when the folder has no ``canary.json`` (warned once per process and folder).
    ``files`` names the checkpoint's files that decide its vectors, for the error message.

    Raises:
        PromcseError: A malformed ``canary.json`` (see :func:`read_canaries`), or vectors that differ by more than the
            tolerance (naming the largest difference and the likely causes).
    """
    folder = Path(directory)
    path = folder / CANARY_FILE
    if not os.path.lexists(path):
        _warn_missing(folder)
        return False
    texts, stored, tolerance = read_canaries(path, encoder.dim)
    got = compute_canaries(encoder, texts).astype(np.float64)
    diff = float(np.abs(got - stored).max()) if np.isfinite(got).all() else math.inf
    allowed = tolerance * max(1.0, float(np.abs(stored).max()))
    if diff > allowed:
        raise PromcseError(
            f"this checkpoint no longer computes the vectors it recorded for its canary texts: they differ by up to "
            f"{diff:.3g} (allowed {allowed:.3g}); likely causes: a different backbone than the one it was trained on "
            f"(it records '{encoder.spec.backbone}'), a damaged or edited {files}, or changed code",
            path=path, key="vectors")
    return True
