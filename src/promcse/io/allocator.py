"""glibc allocator controls: give free heap pages back (``malloc_trim``) and cap the arenas (``mallopt``).

Long-running work whose tensors change shape at every step (the server's batches, a corpus encode's shards)
leaves glibc's heap full of free holes that it keeps instead of returning to the system, so RSS climbs with
no leak behind it (issue 15; docs/RELIABILITY.md "Soak"). Both calls are one ``ctypes`` call each, written
by hand because neither the standard library nor torch or numpy exposes them; both are no-ops (False) where
the C library lacks them (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

_TRIM: list[Callable[[int], int] | None] = []  # glibc's malloc_trim, looked up once ([None]: not available)


def malloc_trim() -> bool:
    """Return the free pages of every glibc malloc arena to the system (``malloc_trim(0)``); False where the C
    library has no ``malloc_trim`` (macOS, Windows): a no-op there."""
    if not _TRIM:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            except (AttributeError, OSError):
                fn = None
        _TRIM.append(fn)
    if _TRIM[0] is None:
        return False
    _TRIM[0](0)
    return True


M_ARENA_MAX = -8  # glibc's mallopt parameter number for the arena cap (malloc.h)


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at ``count`` (``mallopt(M_ARENA_MAX, count)``, what ``MALLOC_ARENA_MAX`` sets);
    False where the C library has no ``mallopt`` or refuses. Call it before threads start allocating: arenas
    made before it stay.

    Each thread that allocates may get its own arena (up to 8 per core), and the free space of each is kept
    apart; the server's event loop, tokenizer and model threads then hold separate free lists of every batch
    shape.
    """
    if count < 1 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))
