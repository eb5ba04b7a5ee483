"""Interop: export to sentence-transformers / MTEB and to ONNX."""

from typing import Any

# promcse 0.1's docs imported MTEBEncoder from ``promcse.export``, then a module, now this folder.
_MOVED = {"MTEBEncoder": "promcse.export.sentence_transformers"}


def __getattr__(name: str) -> Any:
    """The names promcse 0.1's docs imported from ``promcse.export``, with a DeprecationWarning."""
    if name in _MOVED:
        import importlib

        from promcse._moved import warn_moved

        warn_moved(f"promcse.export.{name}", f"{_MOVED[name]}.{name}")
        value = getattr(importlib.import_module(_MOVED[name]), name)
        globals()[name] = value  # warned once; later lookups are plain attributes
        return value
    raise AttributeError(f"module 'promcse.export' has no attribute {name!r}")
