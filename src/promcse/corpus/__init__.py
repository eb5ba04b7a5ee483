"""Corpus scale: vectors on disk (shards), corpus encoding (local and Ray), index kinds, search and hard-negative mining."""

from typing import Any

# promcse 0.1's docs imported EncodeJob from ``promcse.corpus``, then a module, now this folder.
_MOVED = {"EncodeJob": "promcse.corpus.encode"}


def __getattr__(name: str) -> Any:
    """The names promcse 0.1's docs imported from ``promcse.corpus``, with a DeprecationWarning."""
    if name in _MOVED:
        import importlib

        from promcse._moved import warn_moved

        warn_moved(f"promcse.corpus.{name}", f"{_MOVED[name]}.{name}")
        value = getattr(importlib.import_module(_MOVED[name]), name)
        globals()[name] = value  # warned once; later lookups are plain attributes
        return value
    raise AttributeError(f"module 'promcse.corpus' has no attribute {name!r}")
