"""Crash-safe writes: every file and directory promcse produces appears complete or not at all.

A file is written to a temporary name in its own directory, fsynced and renamed over the final name
(``os.replace`` is atomic on POSIX filesystems); a directory is filled under a temporary name, every file
in it fsynced, then renamed, and the parent directory fsynced so the rename itself survives a power cut.
Checkpoints, training states, indexes and exports all go through here.

Before any work starts, :func:`check_output_file` and :func:`check_output_dir` refuse an output that cannot be
written (under a regular file, in ``/proc`` or another unwritable place), that is of the wrong kind (a
directory where a file belongs and vice versa, a FIFO or device), that would overwrite an input, or an existing
directory holding files that are not the writer's own. Missing parent directories are created when the
output is written, as for every promcse output. :func:`file_manifest` and :func:`verify_manifest` record and
check the size and sha256 of every file a directory holds (indexes). :func:`cache_home` is where promcse's caches
live.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from promcse.errors import PromcseError


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (a rename inside it) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` via ``write(tmp_path)`` to a temporary file beside it, fsync, then rename."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync_file(Path(tmp))
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write a UTF-8 text file (``\\n`` line ends, never translated)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def atomic_directory(final: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``final`` by ``fill(tmp_dir)`` under a temporary name, fsync, then rename.

    An existing ``final`` stays whole until the new one is complete: the two are then exchanged in one
    atomic rename where the system has one (Linux ``renameat2``), else the old one is renamed aside and the
    new one renamed in (two renames, nothing half-written in between), and the old one is removed.
    """
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        fsync_dir(tmp)
        _swap_in(tmp, target)
        fsync_dir(target.parent)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at ``target``; afterwards ``tmp`` holds the old one, if any."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
    elif not _exchange(tmp, target):
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        os.replace(old, tmp)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``.`` for a relative path with none)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_writable(path: Path, where: Path) -> None:
    """Refuse ``path`` unless a file can be created in ``where`` (or its nearest existing ancestor)."""
    base = _nearest_existing(where)
    if not base.is_dir():
        raise PromcseError(f"cannot write here: {base} is a file, not a directory", path=path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".promcse-write-test.", dir=base)
    except OSError as err:
        raise PromcseError(f"cannot write in {base} ({err.strerror})", path=path) from None
    os.close(fd)
    os.unlink(probe)


def _inside(inner: Path, outer: Path) -> bool:
    """Whether resolved ``inner`` is ``outer`` or lies under it."""
    return inner == outer or outer in inner.parents


def check_output_file(path: str | Path, inputs: Iterable[str | Path] = (), label: str = "output") -> Path:
    """Refuse, before any work, a file output that cannot be written or would destroy something.

    Refused: an existing directory, FIFO or device at ``path``; a path under a regular file; a place where
    no file can be created (``/proc``, a read-only mount); ``path`` being one of ``inputs``.

    Args:
        path: The file to write.
        inputs: Files read by the run: ``path`` may not be one of them.
        label: The caller's name for ``path`` (its argument or field), given as the error's ``key``.

    Raises:
        PromcseError: Naming ``path`` and the reason.
    """
    out = Path(path)
    if out.is_dir():
        raise PromcseError("is an existing directory; give a file name", path=out, key=label)
    if out.exists() and not out.is_file():
        raise PromcseError("exists and is not a regular file (a FIFO or device?)", path=out, key=label)
    for source in inputs:
        if os.path.exists(source) and (out.resolve() == Path(source).resolve()
                                       or (out.exists() and os.path.samefile(out, source))):
            raise PromcseError(f"is the input file {source}; writing it would destroy the input", path=out,
                               key=label)
    _check_writable(out, out.parent)
    return out


def check_output_dir(path: str | Path, *, ours: Callable[[str], bool] = lambda name: False,
                     inputs: Iterable[str | Path] = (), scanned: Iterable[str | Path] = (), replaced: bool = False,
                     what: str = "output directory", label: str = "output") -> Path:
    """Refuse, before any work, a directory output that cannot be written or would destroy something.

    Args:
        path: The directory to write (created when written, parents too).
        ours: Which names an existing ``path`` may hold (the writer's own files); anything else is refused.
        inputs: Files or directories read by the run: none may be ``path`` or lie inside it.
        scanned: Directories read recursively: ``path`` may not lie inside one (its files would be read).
        replaced: The directory is replaced as a whole (its parent must be writable), not written into.
        what: What the directory is, for messages.
        label: The caller's name for ``path`` (its argument or field), given as the error's ``key``.

    Raises:
        PromcseError: Naming ``path`` and the reason.
    """
    out = Path(path)
    if os.path.lexists(out) and not out.is_dir():
        raise PromcseError(f"exists and is not a directory; a {what} is written here", path=out, key=label)
    resolved = out.resolve()
    for source in inputs:
        if os.path.exists(source) and _inside(Path(source).resolve(), resolved):
            raise PromcseError(f"contains the input {source}; writing here would overwrite it", path=out, key=label)
    for source in scanned:
        if Path(source).is_dir() and _inside(resolved, Path(source).resolve()):
            raise PromcseError(f"is inside the input directory {source}; its files would be read as input",
                               path=out, key=label)
    if out.is_dir():
        foreign = sorted(name for name in os.listdir(out) if not ours(name))
        if foreign:
            shown = ", ".join(repr(name) for name in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise PromcseError(f"holds files that are not part of a {what} ({shown}); choose a new or "
                               "empty directory", path=out, key=label)
    _check_writable(out, out.parent if replaced or not out.is_dir() else out)
    return out


def cache_home() -> Path:
    """promcse's cache folder: ``$PROMCSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/promcse``, else ``~/.cache/promcse``.

    Each kind of cache lives in its own subfolder (``onnx``, ``embeddings``).
    """
    if os.environ.get("PROMCSE_CACHE_DIR"):
        return Path(os.environ["PROMCSE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "promcse"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(directory: str | Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the named files in ``directory``."""
    root = Path(directory)
    return {name: {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)} for name in names}


def verify_manifest(directory: str | Path, files: object, required: Iterable[str], record: str | Path) -> None:
    """Check every file :func:`file_manifest` listed: present, a regular file, its size and sha256 unchanged.

    Args:
        directory: Where the files are.
        files: The manifest as read from ``record`` (checked to be a mapping of plain names).
        required: Names the manifest must list.
        record: The file holding the manifest, for messages.

    Raises:
        PromcseError: Naming the file that is missing, truncated, changed or not listed.
    """
    root = Path(directory)
    if not isinstance(files, dict) or not all(isinstance(name, str) and name and Path(name).name == name
                                              and isinstance(entry, dict) for name, entry in files.items()):
        raise PromcseError("expected an object of file names to {bytes, sha256}", path=record, key="files")
    for name in required:
        if name not in files:
            raise PromcseError(f"the file manifest does not list {name}", path=record, key="files")
    for name, entry in files.items():
        path = root / name
        try:
            info = os.stat(path)
        except OSError:
            raise PromcseError(f"missing (listed in {Path(record).name}); the directory is incomplete", path=path) from None
        if not stat.S_ISREG(info.st_mode):
            raise PromcseError("not a regular file", path=path)
        if info.st_size != entry.get("bytes"):
            raise PromcseError(f"is {info.st_size} bytes but {entry.get('bytes')} were written: truncated or "
                               "changed since it was saved", path=path)
        if sha256_file(path) != entry.get("sha256"):
            raise PromcseError("does not match the checksum recorded when it was saved: changed or damaged",
                               path=path)


@contextlib.contextmanager
def directory_lock(directory: str | Path, what: str = "promcse") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (``.promcse.lock``; the owner's pid in ``.promcse.lock.owner``).

    Two runs writing into one directory would interleave their files; the second is refused at once. The lock
    is filelock's OS lock (``flock`` on POSIX, ``msvcrt`` on Windows), which the OS drops when the process dies,
    so a crash never leaves it stale; the owner file only serves the message.

    Raises:
        PromcseError: When another process holds it.
    """
    from filelock import FileLock, Timeout

    lock, owner = FileLock(str(Path(directory) / ".promcse.lock")), Path(directory) / ".promcse.lock.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text(encoding="utf-8").strip() if owner.is_file() else ""
        raise PromcseError(f"{what} is already writing here (pid {holder or 'another process'}); wait for it or "
                           "use another directory", path=directory) from None
    try:
        owner.write_text(str(os.getpid()), encoding="utf-8")
        yield
    finally:
        lock.release()
