"""Sharded vector directories: what ``promcse encode --output DIR`` writes and ``index build --from-vectors`` reads.

A directory holds fixed-size shards (the last may be shorter) and one ``manifest.json``::

    manifest.json            model, dim, dtype, normalize, shard size, input fingerprint, and per shard
                             its rows, first row and the sha256 of each of its files
    shard-00000.npy          (rows, dim) vectors in the stored dtype: float32, float16 or int8
    shard-00000.scales.npy   int8 only: (rows,) float32 per-vector scales; vector ~= codes * scale
    shard-00000.rows.jsonl   one JSON object per row: {"id": ..., "text": ...} ("text" unless --no-texts)

Int8 is symmetric per-vector quantisation: ``scale = max|x| / 127`` and ``codes = round(x / scale)``, so
each coordinate is off by at most ``scale / 2`` (cosine error ~1e-4 at D=384 for unit vectors).

Every file is written with :func:`promcse.io.files.atomic_write`, the shard's files before the manifest entry
that names them, so a shard is either listed with checksums that match or treated as not done.
Nothing is pickled (``numpy.load(allow_pickle=False)``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from promcse.io.jsonl import iter_jsonl
from promcse.errors import PromcseError
from promcse.io.schema import load_array, read_versioned
from promcse.io.files import atomic_write, atomic_write_text, check_output_dir, sha256_file  # noqa: F401

FORMAT = "promcse-vectors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES: dict[str, str] = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                          "int8": "int8"}
# Fields that must agree between a resumed run and its directory, and between the parts of a merge.
SAME_RUN = ("model", "dim", "dtype", "normalize", "shard_size", "with_texts", "input")


def canonical_dtype(name: str) -> str:
    """``fp32``/``float32`` -> ``float32``, ``fp16``/``float16`` -> ``float16``, ``int8``."""
    if name not in DTYPES:
        raise PromcseError(f"unknown vector dtype '{name}'; choose fp32, fp16 or int8")
    return DTYPES[name]


def quantize(vectors: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored form of float vectors: the array in ``dtype`` and, for int8, the per-vector scales."""
    vectors = np.asarray(vectors, dtype=np.float32)
    dtype = canonical_dtype(dtype)
    if dtype != "int8":
        return vectors.astype(dtype), None
    scales = (np.abs(vectors).max(axis=1) / 127.0).astype(np.float32) if vectors.size else np.zeros(len(vectors),
                                                                                                    np.float32)
    divisor = np.where(scales > 0, scales, 1.0)[:, None]
    codes = np.clip(np.rint(vectors / divisor), -127, 127).astype(np.int8)
    return codes, scales


def dequantize(stored: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Float32 vectors back from their stored form (exact for float32, rounding error otherwise)."""
    out = np.asarray(stored, dtype=np.float32)
    return out * np.asarray(scales, dtype=np.float32)[:, None] if scales is not None else out


def owned_name(name: str) -> bool:
    """Whether a file name in a vector directory is one this module writes (or a temporary of one), so an
    existing directory holding only such names may be written into (resumed, merged into)."""
    return name == MANIFEST or name.startswith(("shard-", ".shard-", f".{MANIFEST}."))


def shard_name(index: int) -> str:
    """``shard-00012``: the stem of shard ``index``'s files."""
    return f"shard-{index:05d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_file(root: Path, name: str, data: bytes) -> str:
    """Atomically write ``root/name``; returns the sha256 of ``data``."""
    atomic_write(root / name, lambda tmp: tmp.write_bytes(data))
    return hashlib.sha256(data).hexdigest()


def write_shard(root: Path, index: int, start: int, vectors: np.ndarray, ids: list[Any], texts: list[str] | None,
                dtype: str) -> dict[str, Any]:
    """Write shard ``index`` (rows ``start ..``) and return its manifest entry; the manifest is the caller's."""
    stored, scales = quantize(vectors, dtype)
    stem = shard_name(index)
    entry: dict[str, Any] = {"index": index, "start": start, "rows": len(ids), "files": {}}
    records = ({"id": i} if texts is None else {"id": i, "text": t} for i, t in zip(ids, texts or ids))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    parts = {"vectors": (f"{stem}.npy", _npy_bytes(stored)), "rows": (f"{stem}.rows.jsonl", lines)}
    if scales is not None:
        parts["scales"] = (f"{stem}.scales.npy", _npy_bytes(scales))
    for role, (name, data) in parts.items():
        entry["files"][role] = {"name": name, "sha256": _write_file(root, name, data)}
    return entry


def verify_shard(root: Path, entry: dict[str, Any]) -> bool:
    """Whether every file of a manifest entry exists with its recorded checksum."""
    try:
        return all(sha256_file(root / f["name"]) == f["sha256"] for f in entry["files"].values())
    except (OSError, KeyError, TypeError):
        return False


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check ``DIR/manifest.json``.

    Raises:
        PromcseError: No manifest, unreadable JSON, or not a promcse vector directory.
    """
    return read_versioned(Path(root) / MANIFEST, FORMAT, FORMAT_VERSION, "vector directory")


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Atomically (re)write the manifest, shards in index order."""
    manifest["shards"] = sorted(manifest["shards"], key=lambda e: e["index"])
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def require_complete(root: str | Path) -> dict[str, Any]:
    """The manifest of a finished, whole encode (every shard present), for readers such as index build.

    Raises:
        PromcseError: An unfinished encode, one part of a ``--shard i/N`` split, or missing shards.
    """
    manifest = read_manifest(root)
    if not manifest.get("complete"):
        raise PromcseError("the encode is unfinished: run the same promcse encode again to finish it", path=root)
    if manifest.get("part"):
        part = manifest["part"]
        raise PromcseError(f"this is part {part['index']}/{part['count']} of a split encode: merge the parts "
                           "into one directory first", path=root)
    found = [e["index"] for e in manifest["shards"]]
    if found != list(range(int(manifest["num_shards"]))):
        raise PromcseError("the manifest does not list every shard", path=Path(root) / MANIFEST)
    return manifest


def _load(path: Path) -> np.ndarray:
    return load_array(path)


def read_vectors(root: str | Path, entry: dict[str, Any]) -> np.ndarray:
    """One shard's vectors as float32 (int8 codes rescaled), shape (rows, dim)."""
    files = entry["files"]
    stored = _load(Path(root) / files["vectors"]["name"])
    scales = _load(Path(root) / files["scales"]["name"]) if "scales" in files else None
    if stored.ndim != 2 or len(stored) != entry["rows"]:
        raise PromcseError(f"expected {entry['rows']} rows of vectors, got shape {stored.shape}",
                           path=Path(root) / files["vectors"]["name"])
    return dequantize(stored, scales)


def read_rows(root: str | Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard's ``{"id", "text"}`` records in row order."""
    path = Path(root) / entry["files"]["rows"]["name"]
    return [obj for _, obj in iter_jsonl(path)]


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [key for key in SAME_RUN if a.get(key) != b.get(key)]


def _check_parts(dirs: list[Path], manifests: list[dict[str, Any]]) -> None:
    """Every part finished and of the same run (model, dim, dtype, normalize, shard size, input)."""
    first = manifests[0]
    for root, manifest in zip(dirs, manifests):
        if not manifest.get("complete"):
            raise PromcseError("this part is unfinished: run its promcse encode again first", path=root)
        differ = _differences(first, manifest) + [k for k in ("total_rows", "num_shards")
                                                  if first.get(k) != manifest.get(k)]
        if differ:
            raise PromcseError(f"not a part of the same encode as {dirs[0]} ({', '.join(differ)} differ)", path=root)


def _collect(dirs: list[Path], manifests: list[dict[str, Any]]) -> list[tuple[Path, dict[str, Any]]]:
    """Every shard once, in order, with the directory holding it; duplicates and gaps are errors."""
    owner: dict[int, tuple[Path, dict[str, Any]]] = {}
    for root, manifest in zip(dirs, manifests):
        for entry in manifest["shards"]:
            if entry["index"] in owner:
                raise PromcseError(f"shard {entry['index']} is in both {owner[entry['index']][0]} and {root}")
            owner[entry["index"]] = (root, entry)
    missing = [i for i in range(int(manifests[0]["num_shards"])) if i not in owner]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise PromcseError(f"{len(missing)} shard(s) missing from the parts given: {shown}")
    return [owner[i] for i in sorted(owner)]


def _place(source: Path, target: Path) -> None:
    """Put ``source`` at ``target``: a hard link where possible, else a copy; atomic either way."""
    if target.exists() and os.path.samefile(source, target):
        return
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(target, lambda path: shutil.copyfile(source, path))


def merge(dirs: list[str | Path], output: str | Path) -> dict[str, Any]:
    """Join the parts of a ``--shard i/N`` split into one directory, as if encoded in one run.

    Checks that the parts are finished, of the same model/dim/dtype/input, and together hold every shard
    exactly once with matching checksums; links (or copies) the files, then writes the manifest last.

    Raises:
        PromcseError: Naming the part or shard at fault.
    """
    roots = [Path(d) for d in dirs]
    if not roots:
        raise PromcseError("needs at least one part directory", key="dirs")
    # the output may not be a part, hold one or lie inside one: the merge would rewrite a part it reads
    out = check_output_dir(output, ours=owned_name, inputs=roots, scanned=roots, what="vector directory")
    manifests = [read_manifest(r) for r in roots]
    _check_parts(roots, manifests)
    shards = _collect(roots, manifests)
    out.mkdir(parents=True, exist_ok=True)
    for root, entry in shards:
        if not verify_shard(root, entry):
            raise PromcseError(f"shard {entry['index']} does not match its checksum", path=root)
        for f in entry["files"].values():
            _place(root / f["name"], out / f["name"])
    merged = {**manifests[0], "part": None, "shards": [entry for _, entry in shards]}
    write_manifest(out, merged)
    return merged
