"""promcse: prompt-based contrastive sentence embeddings (PromCSE) and SimCSE on a frozen encoder."""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "load", "save_pretrained", "Index", "PromcseError"]

from promcse.errors import PromcseError
from promcse.version import __version__
from promcse import _moved

_moved.install()  # promcse 0.1 module paths named in its docs (promcse.sts, ...) still import, with a warning


def load(model: str, device: str = "auto", **kwargs: Any) -> Any:
    """Load an encoder (checkpoint dir, a Hugging Face Hub id ``org/name`` (cache first), a local path, or ``minilm``); see :func:`promcse.models.loading.load`."""
    from promcse.models.loading import load as _load

    return _load(model, device=device, **kwargs)


def save_pretrained(encoder: Any, directory: str, **options: Any) -> Any:
    """Save an encoder as a checkpoint folder with a Hub model card (README.md), ready for ``promcse push``;
    see :func:`promcse.models.hub.save_pretrained`."""
    from promcse.models.hub import save_pretrained as _save

    return _save(encoder, directory, **options)


def __getattr__(name: str) -> Any:
    """Lazy attributes: ``promcse.Index`` imports FAISS only when used."""
    if name == "Index":
        from promcse.corpus.search import Index

        return Index
    raise AttributeError(f"module 'promcse' has no attribute {name!r}")
