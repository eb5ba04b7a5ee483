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
from promcse.io.schema import load_array
from promcse.io.files import atomic_write, atomic_write_text, check_output_dir, sha256_file  # noqa: F401
from promcse.io.schema import read_versioned
from promcse.io.json_fields import MAX_DIM, MAX_ROWS, checked, only, plain_name, sha256_hex

FORMAT = "promcse-vectors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES: dict[str, str] = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                          "int8": "int8"}
# Fields that must agree between a resumed run and its directory, and between the parts of a merge.
SAME_RUN = ("model", "dim", "dtype", "normalize", "shard_size", "with_texts", "input")
MANIFEST_KEYS = ("format", "format_version", *SAME_RUN, "part", "complete", "total_rows", "num_shards", "shards")


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
    refuse_non_finite(vectors, index, list(range(len(vectors))))
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
    """Read ``DIR/manifest.json`` strictly: every field's type and range (:func:`check_manifest`).

    Raises:
        PromcseError: No manifest, unreadable JSON, not a promcse vector directory, or a bad field (named).
    """
    path = Path(root) / MANIFEST
    manifest = read_versioned(path, FORMAT, FORMAT_VERSION, "vector directory")
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Every field of a manifest: exact types, ranges, the shard entries, no unknown keys.

    Raises:
        PromcseError: Naming ``path`` and the key (``shards[2].rows``).
    """
    only(manifest, MANIFEST_KEYS, path)
    checked(manifest, "model", str, path, null=True)
    checked(manifest, "dim", int, path, lo=1, hi=MAX_DIM)
    checked(manifest, "dtype", str, path, choices=sorted(set(DTYPES.values())))
    for key in ("normalize", "with_texts", "complete"):
        checked(manifest, key, bool, path)
    checked(manifest, "shard_size", int, path, lo=1, hi=MAX_ROWS)
    checked(manifest, "input", dict, path)
    part = checked(manifest, "part", dict, path, null=True)
    if part is not None:
        only(part, ("index", "count"), path, "part")
        count = checked(part, "count", int, path, where="part", lo=2, hi=MAX_ROWS)
        checked(part, "index", int, path, where="part", lo=0, hi=count - 1)
    total = checked(manifest, "total_rows", int, path, lo=0, hi=MAX_ROWS, null=True)
    shards = checked(manifest, "num_shards", int, path, lo=0, hi=MAX_ROWS, null=True)
    if manifest["complete"] and (total is None or shards is None):
        raise PromcseError("a complete encode records its row and shard counts", path=path,
                           key="total_rows" if total is None else "num_shards")
    if total is not None and shards is not None and shards != -(-total // manifest["shard_size"]):
        raise PromcseError(f"{total} rows in shards of {manifest['shard_size']} are not {shards} shards", path=path,
                           key="num_shards")
    seen: set[int] = set()
    for number, entry in enumerate(checked(manifest, "shards", list, path)):
        index = _check_entry(manifest, entry, f"shards[{number}]", path)
        if index in seen:
            raise PromcseError(f"shard {index} is listed twice", path=path, key=f"shards[{number}].index")
        seen.add(index)


def _check_entry(manifest: dict[str, Any], entry: Any, where: str, path: Path) -> int:
    """One shard entry: index, first row (``index * shard_size``), rows, and its files; returns the index."""
    if not isinstance(entry, dict):
        raise PromcseError(f"expected an object, got {type(entry).__name__}", path=path, key=where)
    only(entry, ("index", "start", "rows", "files"), path, where)
    size, total, count = manifest["shard_size"], manifest["total_rows"], manifest["num_shards"]
    index = checked(entry, "index", int, path, where=where, lo=0, hi=MAX_ROWS // size if count is None else count - 1)
    checked(entry, "start", int, path, where=where, lo=index * size, hi=index * size)
    checked(entry, "rows", int, path, where=where, lo=1, hi=size if total is None else min(size, total - index * size))
    files = checked(entry, "files", dict, path, where=where)
    roles = ("vectors", "rows", "scales") if manifest["dtype"] == "int8" else ("vectors", "rows")
    only(files, roles, path, f"{where}.files")
    for role in roles:
        spec = checked(files, role, dict, path, where=f"{where}.files")
        key = f"{where}.files.{role}"
        only(spec, ("name", "sha256"), path, key)
        name = plain_name(checked(spec, "name", str, path, where=key), path, f"{key}.name")
        if not name.startswith("shard-"):
            raise PromcseError("a shard's file names start with 'shard-'", path=path, key=f"{key}.name")
        sha256_hex(checked(spec, "sha256", str, path, where=key), path, f"{key}.sha256")
    return index


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
    if sum(e["rows"] for e in manifest["shards"]) != manifest["total_rows"]:
        raise PromcseError("the shards' rows do not add up to total_rows", path=Path(root) / MANIFEST,
                           key="total_rows")
    return manifest


def check_shard(root: str | Path, entry: dict[str, Any]) -> None:
    """Every file of a (checked) manifest entry is there with the sha256 the manifest records.

    Raises:
        PromcseError: Naming the file that is missing or changed since the encode wrote it.
    """
    for spec in entry["files"].values():
        path = Path(root) / spec["name"]
        if not path.is_file():
            raise PromcseError(f"missing: {MANIFEST} lists it for shard {entry['index']}", path=path)
        if sha256_file(path) != spec["sha256"]:
            raise PromcseError(f"does not match the sha256 {MANIFEST} records for it (changed since the encode "
                               "wrote it): encode the corpus again, or restore the file", path=path)


def _load(path: Path) -> np.ndarray:
    return load_array(path)


def require_finite(vectors: np.ndarray, path: Path | None = None) -> None:
    """Refuse NaN or infinite values, naming the file (if any) and the first such row (0-based)."""
    bad = ~np.isfinite(vectors).reshape(len(vectors), -1).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
        raise PromcseError(f"row {int(rows[0])}{more} holds NaN or infinite values; an index over it would "
                           "answer wrongly", path=path)


def refuse_non_finite(vectors: np.ndarray, shard: int, positions: list[int]) -> None:
    """Stop an encode before a NaN or infinite vector reaches a shard (an index over it would answer wrongly):
    the message names the shard and the row in it (``positions[i]`` is vector ``i``'s row)."""
    bad = ~np.isfinite(np.asarray(vectors, dtype=np.float32)).reshape(len(vectors), -1).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise PromcseError(f"the encoder returned NaN or infinite values for row {positions[first]} of shard "
                           f"{shard} ({int(bad.sum())} such row(s) in this batch); nothing of it was stored",
                           key="vectors")


def finite_matrix(vectors: Any, key: str = "vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (N, D) matrix of finite values (the argument named by ``key``).

    Raises:
        PromcseError: Not a 2-D array of numbers, or NaN/infinite values (the first such row named).
    """
    try:
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise PromcseError(f"expected a matrix of numbers: {err}", key=key) from None
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise PromcseError(f"expected an (N, D) matrix, got shape {matrix.shape}", key=key)
    try:
        require_finite(matrix)
    except PromcseError as err:
        raise PromcseError(err.message, key=key) from None
    return matrix


def read_vectors(root: str | Path, entry: dict[str, Any]) -> np.ndarray:
    """One shard's vectors as float32 (int8 codes rescaled), shape (rows, dim).

    Raises:
        PromcseError: A file of the wrong shape or type, or NaN/infinite values (file and row named).
    """
    files = entry["files"]
    path = Path(root) / files["vectors"]["name"]
    stored = _load(path)
    if stored.ndim != 2 or len(stored) != entry["rows"] or stored.dtype.kind not in "fi":
        raise PromcseError(f"expected {entry['rows']} rows of vectors, got {stored.dtype} {stored.shape}", path=path)
    scales = None
    if "scales" in files:
        scales_path = Path(root) / files["scales"]["name"]
        scales = _load(scales_path)
        if scales.shape != (len(stored),) or scales.dtype.kind != "f":
            raise PromcseError(f"expected {len(stored)} float scales, got {scales.dtype} {scales.shape}",
                               path=scales_path)
        require_finite(scales, scales_path)
    vectors = dequantize(stored, scales)
    require_finite(vectors, path)
    return vectors


def read_rows(root: str | Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard's ``{"id", "text"}`` records in row order.

    Raises:
        PromcseError: A record without an id, a text that is not a string, or not one record per row.
    """
    path = Path(root) / entry["files"]["rows"]["name"]
    rows = []
    for number, obj in iter_jsonl(path):
        if "id" not in obj or not isinstance(obj.get("text", ""), str):
            raise PromcseError('expected {"id": ..., "text": str}', path=path, line=number)
        rows.append(obj)
    if len(rows) != entry["rows"]:
        raise PromcseError(f"holds {len(rows)} records for {entry['rows']} rows", path=path)
    return rows


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
