"""Crash-safe writes: every file and directory promcse produces appears complete or not at all.

A file is written to a temporary name in its own directory, fsynced and renamed over the final name
(``os.replace`` is atomic on POSIX filesystems); a directory is filled under a temporary name, every file
in it fsynced, then renamed, and the parent directory fsynced so the rename itself survives a power cut.
Checkpoints, training states, indexes and exports all go through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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

    An existing ``final`` is replaced only once the new one is complete.
    """
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def directory_lock(directory: str | Path, what: str = "promcse") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (file ``.promcse.lock`` with the owner's pid) while inside.

    Two runs writing into one directory would interleave their files; the second is refused at once.
    The lock is an ``flock``: the kernel drops it when the process dies, so a crash never leaves it stale.

    Raises:
        PromcseError: When another process holds it.
    """
    import fcntl

    path = Path(directory) / ".promcse.lock"
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise PromcseError(f"{what} is already writing here (pid {owner}); wait for it or use another "
                               f"directory", path=directory) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()
