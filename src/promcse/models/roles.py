"""Query and document roles over one backbone: a role pair on disk and the :class:`RoleEncoder` it loads as.

A role pair is a directory holding ``roles.json``::

    {"format": "promcse-roles", "format_version": 1, "query": "query", "document": null}

Each role is a promcse checkpoint folder inside the directory (a path relative to it), or ``null``: the frozen
backbone of the other role's checkpoint (mean pooling, as ``promcse.load`` gives a bare backbone). At least one
role is a checkpoint; both checkpoints must record the same backbone and be prompt or frozen checkpoints (a
``full`` fine-tune carries a backbone of its own). Loaded, both roles run on one backbone module object, so its
weights exist once in memory. :func:`save_roles` writes a pair; :func:`load_roles` reads one (through
:func:`promcse.models.loading.load`, which recognises the directory).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.encoder.backbone import resolve_backbone
from promcse.encoder.encode import cosine_matrix
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder, default_spec
from promcse.errors import PromcseError
from promcse.io.files import atomic_directory, atomic_write_text, check_output_dir
from promcse.io.schema import read_versioned
from promcse.models.checkpoint import is_checkpoint, load_checkpoint, read_spec

FORMAT = "promcse-roles"
FORMAT_VERSION = 1
ROLES_FILE = "roles.json"
ROLES: tuple[str, ...] = ("query", "document")
KEYS: tuple[str, ...] = ("format", "format_version", *ROLES)

BackboneSource = Callable[[str], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


class RoleEncoder(nn.Module):
    """A query encoder and a document encoder over one backbone module object.

    ``encode_query``/``encode_document`` are sentence-transformers' names; ``encode(texts, role=...)`` picks a
    role by name and defaults to ``document`` (what the server's ``input_type`` defaults to).
    """

    def __init__(self, query: SentenceEncoder, document: SentenceEncoder) -> None:
        super().__init__()
        if query.backbone is not document.backbone:
            raise PromcseError("the query and document encoders must share one backbone module", key="document")
        self.query = query
        self.document = document

    @property
    def roles(self) -> dict[str, SentenceEncoder]:
        """``{"query": encoder, "document": encoder}``."""
        return {"query": self.query, "document": self.document}

    def side(self, role: str) -> SentenceEncoder:
        """The encoder of ``role`` (``query`` or ``document``).

        Raises:
            PromcseError: Another role name.
        """
        if role not in ROLES:
            raise PromcseError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}", key="role")
        return self.roles[role]

    @property
    def dim(self) -> int:
        """Embedding size (the same for both roles: one backbone)."""
        return self.document.dim

    @property
    def max_length(self) -> int:
        """Longest real-token input that both roles take."""
        return min(self.query.max_length, self.document.max_length)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The backbone's tokenizer (shared by both roles)."""
        return self.document.tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the backbone weights."""
        return self.document.device

    def encode(self, texts: list[str], role: str = "document", **kwargs: Any) -> Any:
        """Encode ``texts`` as ``role``; keyword arguments as for :meth:`SentenceEncoder.encode`."""
        return self.side(role).encode(texts, **kwargs)

    def encode_query(self, texts: list[str], **kwargs: Any) -> Any:
        """Encode search queries (the ``query`` role)."""
        return self.query.encode(texts, **kwargs)

    def encode_document(self, texts: list[str], **kwargs: Any) -> Any:
        """Encode documents (the ``document`` role)."""
        return self.document.encode(texts, **kwargs)

    def similarity(self, queries: list[str], documents: list[str], batch_size: int = 64) -> np.ndarray:
        """Cosine similarity matrix (len(queries), len(documents)), each side through its own role."""
        a = self.encode_query(queries, batch_size=batch_size, normalize=False)
        b = self.encode_document(documents, batch_size=batch_size, normalize=False)
        return cosine_matrix(a, b)


def is_role_pair(path: str | Path) -> bool:
    """True if ``path`` is a directory with a ``roles.json`` (errors in it are reported when it is read)."""
    return (Path(path) / ROLES_FILE).exists() or (Path(path) / ROLES_FILE).is_symlink()


def _role_path(directory: Path, value: object, path: Path, role: str) -> Path | None:
    """One role's checkpoint folder, checked: null, or a relative path to a checkpoint inside ``directory``."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise PromcseError(f"expected a relative path or null, got {json.dumps(value)[:40]}", path=path, key=role)
    base = directory.resolve()
    target = (base / value).resolve()
    if Path(value).is_absolute() or target == base or base not in target.parents:
        raise PromcseError(f"{value!r} leaves the role pair's directory; give a folder inside it", path=path, key=role)
    if not is_checkpoint(target):
        raise PromcseError(f"{value!r} is not a promcse checkpoint folder", path=path, key=role)
    return target


def read_roles(directory: str | Path) -> dict[str, Path | None]:
    """Read ``roles.json`` strictly: ``{"query": folder or None, "document": folder or None}``.

    Raises:
        PromcseError: Naming ``roles.json`` and the key: unknown or missing keys, wrong types, a path leaving the
            directory or not a checkpoint, both roles null.
    """
    folder = Path(directory)
    path = folder / ROLES_FILE
    data = read_versioned(path, FORMAT, FORMAT_VERSION, "role pair")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise PromcseError(f"unknown key(s) {', '.join(unknown)}; a role pair has {', '.join(KEYS)}",
                           path=path, key=unknown[0])
    missing = [key for key in KEYS if key not in data]
    if missing:
        raise PromcseError("missing key (use null for the frozen backbone)", path=path, key=missing[0])
    refs = {role: _role_path(folder, data[role], path, role) for role in ROLES}
    if all(ref is None for ref in refs.values()):
        raise PromcseError("both roles are null; at least one must name a checkpoint folder", path=path, key="query")
    return refs


def _backbone_identity(name: str) -> str:
    """What decides whether two recorded backbones are the same (a local folder's real path, else the name)."""
    resolved = resolve_backbone(name)
    return str(Path(resolved).resolve()) if Path(resolved).is_dir() else resolved


def check_role_specs(specs: dict[str, EncoderSpec], path: Path) -> EncoderSpec:
    """The shared backbone's spec of the roles' checkpoints; full fine-tunes and two backbones are refused.

    Raises:
        PromcseError: Naming ``path`` and the role key concerned.
    """
    for role, spec in specs.items():
        if spec.mode == "full":
            raise PromcseError("a full fine-tune carries its own backbone; a role pair shares one frozen backbone "
                               "(use a prompt or frozen checkpoint)", path=path, key=role)
    first = next(iter(specs.values()))
    for role, spec in list(specs.items())[1:]:
        if _backbone_identity(spec.backbone) != _backbone_identity(first.backbone) or spec.shape != first.shape:
            raise PromcseError(f"records backbone {spec.backbone!r} (encoder.backbone), the other role "
                               f"{first.backbone!r}: both roles must share one backbone", path=path, key=role)
    return first


def load_roles(directory: str | Path, backbones: BackboneSource) -> RoleEncoder:
    """Load a role pair, both roles over one backbone module from ``backbones`` (see the module docstring).

    Raises:
        PromcseError: A bad ``roles.json`` or checkpoint, or roles over different backbones.
    """
    refs = read_roles(directory)
    path = Path(directory) / ROLES_FILE
    specs = {role: read_spec(ref) for role, ref in refs.items() if ref is not None}
    shared = check_role_specs(specs, path)
    backbone, tokenizer = backbones(shared.backbone)
    sides: dict[str, SentenceEncoder] = {}
    for role, ref in refs.items():
        if ref is not None:
            sides[role] = load_checkpoint(ref, backbone=backbone, tokenizer=tokenizer)
        else:
            sides[role] = build_encoder(default_spec(shared.backbone, backbone), backbone, tokenizer).eval()
    return RoleEncoder(sides["query"], sides["document"])


def save_roles(directory: str | Path, query: str | Path | None = None,
               document: str | Path | None = None) -> Path:
    """Write a role pair: copy the checkpoint folders in (as ``query``/``document``) and write ``roles.json``.

    The directory appears complete or not at all; an existing role pair there is replaced.

    Args:
        directory: The role pair to write (new, or an existing role pair).
        query: The query role's checkpoint folder, or None for the frozen backbone.
        document: The document role's checkpoint folder, or None for the frozen backbone.

    Raises:
        PromcseError: Both None, a folder that is not a promcse checkpoint, checkpoints over different
            backbones or a full fine-tune, or an output directory holding other files.
    """
    given = {role: Path(ref) for role, ref in (("query", query), ("document", document)) if ref is not None}
    if not given:
        raise PromcseError("give a checkpoint folder for at least one role", key="query")
    for role, ref in given.items():
        if not is_checkpoint(ref):
            raise PromcseError("not a promcse checkpoint folder", path=ref, key=role)
    check_role_specs({role: read_spec(ref) for role, ref in given.items()}, Path(directory) / ROLES_FILE)
    out = check_output_dir(directory, ours=lambda name: name in (ROLES_FILE, *ROLES), inputs=list(given.values()),
                           replaced=True, what="role pair", label="directory")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            **{role: role if role in given else None for role in ROLES}}

    def fill(tmp: Path) -> None:
        for role, ref in given.items():
            shutil.copytree(ref, tmp / role)
        atomic_write_text(tmp / ROLES_FILE, json.dumps(meta, indent=2) + "\n")

    return atomic_directory(out, fill)
