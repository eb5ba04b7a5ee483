"""Files of the prompt store (:mod:`promcse.serving.store`): names, versions, change stamps, upload checks, and the
clean-up of what a crashed write left.

- A prompt name is :data:`NAME_RE`: 1-64 letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit
  (so no path separator, no ``..``, no hidden folder).
- A version is ``sha256:`` + the SHA-256 over a folder's files (:func:`folder_version`); a start-up model's is
  hashed the same way from its folder (:func:`reference_version`).
- A stamp (:func:`folder_stamp`) is what a replica re-reads on every use to notice another process's write:
  ``stat`` of the folder and of each file, no file contents.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # no path separator, no leading dot, at most 64
FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){0,3}$")
MAX_FILES = 64
MARKERS = ("config.json", "roles.json", "adapter_config.json")  # a folder holding none of these is not a prompt

Stamp = tuple[Any, ...]


def is_prompt_folder(folder: Path) -> bool:
    """A folder that may hold a model (one of :data:`MARKERS`); whether it loads is only known by loading it."""
    return folder.is_dir() and any((folder / marker).is_file() for marker in MARKERS)


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` as (relative POSIX path, path), sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            path = Path(base) / name
            found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


def folder_version(folder: str | Path) -> str:
    """``sha256:HEX`` over a folder's files: for each, sorted by relative path, the path (UTF-8), a NUL, its size
    in decimal, a NUL, then its bytes. Any changed, added, removed or renamed file changes it."""
    digest = hashlib.sha256()
    for rel, path in folder_files(Path(folder)):
        digest.update(rel.encode("utf-8") + b"\0" + str(path.stat().st_size).encode("ascii") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def reference_version(ref: str) -> str:
    """The version of a model loaded at start-up by reference, hashed like a store prompt's: the folder of a
    checkpoint, role pair or local model, the bundled model's folder for ``minilm``, a Hub id's cached snapshot;
    ``name:REF`` when no folder is found."""
    from promcse.encoder.backbone import resolve_backbone

    path = Path(resolve_backbone(ref))
    if not path.is_dir():
        try:
            from promcse.models.hub_resolve import resolve_reference

            path = Path(resolve_reference(ref))  # loaded already, so it is in the cache
        except Exception:  # noqa: BLE001 - a version is a label: never fail a request for it
            return f"name:{ref}"
    return folder_version(path) if path.is_dir() else f"name:{ref}"


def folder_stamp(folder: Path) -> Stamp | None:
    """What a cheap change check compares: the folder's and every file's inode, size and times; None if gone."""
    try:
        top = os.stat(folder)
        parts: list[Any] = [(top.st_ino, top.st_mtime_ns, top.st_ctime_ns)]
        for rel, path in folder_files(folder):
            st = os.stat(path)
            parts.append((rel, st.st_ino, st.st_size, st.st_mtime_ns))
    except FileNotFoundError:
        return None
    return tuple(parts)


def check_files(files: Mapping[str, bytes]) -> None:
    """An upload's file names: 1 to :data:`MAX_FILES` relative paths, at most 4 deep, no hidden part.

    Raises:
        PromcseError: With ``key="files"``.
    """
    if not files or len(files) > MAX_FILES:
        raise PromcseError(f"an upload holds 1 to {MAX_FILES} files, got {len(files)}", key="files")
    for rel in files:
        if not FILE_RE.match(rel):
            raise PromcseError(f"bad file name {rel[:80]!r}: a relative path of letters, digits, '.', '_', '-' "
                               "(no leading dot, at most 4 parts)", key="files")
    dirs = {"/".join(rel.split("/")[:k]) for rel in files for k in range(1, rel.count("/") + 1)}
    clash = sorted(dirs & set(files))
    if clash:
        raise PromcseError(f"{clash[0]!r} is both a file and a folder", key="files")


def check_name(name: str) -> None:
    """Raises PromcseError (``key="name"``) for a prompt name that is not :data:`NAME_RE`."""
    if not NAME_RE.match(name):
        raise PromcseError(f"bad prompt name {name[:80]!r}: 1-64 letters, digits, '.', '_', '-', starting with a "
                           "letter or digit", key="name")


def recover_store(root: Path) -> None:
    """Remove the hidden temporary folders a crashed write left (``.NAME.*.tmp``), and put an ``.old`` folder
    back when its prompt is missing (a crash between the two renames of a replace), else remove it. Call it
    holding the store's lock (another process may be writing)."""
    for entry in os.scandir(root):
        if not (entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)):
            continue
        stem, _, suffix = entry.name[1:].rpartition(".")
        name = stem.rpartition(".")[0]
        if suffix == "old" and NAME_RE.match(name) and not os.path.lexists(root / name):
            os.replace(entry.path, root / name)
        elif suffix in ("tmp", "old"):
            shutil.rmtree(entry.path, ignore_errors=True)
