"""The flat module paths of promcse 0.1 that its documentation named, still importable with a warning.

``import promcse.sts`` and ``from promcse.sts import evaluate`` keep working: the import system finds the
old name here, a :class:`DeprecationWarning` names the new path, and the module object returned *is* the new
module (one copy of every function and class; ``promcse.sts is promcse.evaluation.sts``). Paths that no
document named moved without an alias. Written by hand because the standard library has no module-alias
helper; a finder keeps the package tree free of one stub file per old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

# old path -> new path; only the ones README.md and docs/ named before the stage folders.
MOVED: dict[str, str] = {
    "promcse.allocator": "promcse.io.allocator",
    "promcse.multiprompt": "promcse.encoder.multiprompt",
    "promcse.loading": "promcse.models.loading",
    "promcse.onnx_runtime": "promcse.models.onnx_runtime",
    "promcse.released": "promcse.models.released",
    "promcse.shards": "promcse.corpus.shards",
    "promcse.ray_encode": "promcse.corpus.ray_encode",
    "promcse.search": "promcse.corpus.search",
    "promcse.mine": "promcse.corpus.mine",
    "promcse.sts": "promcse.evaluation.sts",
    "promcse.cxc": "promcse.evaluation.cxc",
    "promcse.plots": "promcse.evaluation.plots",
    "promcse.config": "promcse.training.config",
    "promcse.train": "promcse.training.train",
    "promcse.serve": "promcse.serving.app",
    "promcse.registry": "promcse.serving.registry",
    "promcse.batching": "promcse.serving.batching",
    "promcse.ray_serve": "promcse.serving.ray_serve",
}


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """The one deprecation message for a moved name."""
    warnings.warn(f"{old} moved to {new}; import it from there ({old} will be removed in a later release)",
                  DeprecationWarning, stacklevel=stacklevel)


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and loads each as its new module."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warn_moved(spec.name, MOVED[spec.name], stacklevel=6)
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system overwrites __spec__; exec_module restores it
        return module

    def exec_module(self, module: ModuleType) -> None:
        alias = module.__spec__
        if alias is not None and alias.loader_state is not None:
            module.__spec__ = alias.loader_state  # the module is already executed under its new name


def moved_names(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a folder that replaced a 0.1 module: ``names`` maps each name the 0.1 docs
    imported from ``package`` to the module that holds it now; the first lookup warns, later ones are plain."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module '{package}' has no attribute {name!r}")
        warn_moved(f"{package}.{name}", f"{names[name]}.{name}")
        value = getattr(importlib.import_module(names[name]), name)
        setattr(sys.modules[package], name, value)  # warned once; later lookups are plain attributes
        return value

    return __getattr__


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (the package ``__init__`` calls it)."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedFinder())
