"""The prompt store: a folder of prompts, loaded on first use, kept in a bounded LRU cache, changed while serving.

Every sub-folder ``DIR/NAME`` that holds a promcse prompt checkpoint, a role pair or a PEFT prefix adapter is a
prompt called ``NAME`` (:data:`NAME_RE`; hidden entries are not prompts). A prompt is loaded on its first request,
over the registry's shared backbones (:meth:`promcse.serving.registry.PromptRegistry.load_unlisted`: one copy of
each backbone, whatever the number of prompts), and kept in an LRU cache of at most ``budget_bytes`` of the
prompts' own tensors (prompt + head; the shared backbone is not counted): loading one more evicts the least
recently used ones until the cache fits (a prompt larger than the budget alone is used and dropped). Eviction
only forgets the cache's reference: a request or engine batch that already holds the encoder finishes with it.

Versions: a prompt's version is ``sha256:`` + the SHA-256 over its files (:func:`folder_version`). Several server
processes may serve one store folder: on every use a prompt's folder is re-``stat``-ed (:func:`folder_stamp`:
the folder's and each file's inode, size and modification time), and a prompt whose folder changed is loaded
again (or forgotten, when its folder is gone), so a replica sees another's writes on its next request.

Writes (:meth:`PromptStore.put`, :meth:`PromptStore.delete`) hold the store's lock file (``DIR/.promcse.lock``,
an OS lock that a crash releases) and go through :func:`promcse.io.files.atomic_directory`: the new files are
written to a hidden ``.NAME.*.tmp`` folder, loaded and probed there exactly as a first request would, and only
then swapped in (one ``renameat2`` exchange on Linux; elsewhere the old folder is renamed to ``.NAME.*.old``
before the new one is renamed in). An upload that fails leaves the old version serving. Hidden temporary
folders left by a crash are removed when a store opens (an ``.old`` one is put back when its prompt is missing).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promcse.errors import PromcseError
from promcse.serving.prompt_files import (NAME_RE, Stamp, check_files, check_name, folder_stamp, folder_version,
                                          is_prompt_folder, recover_store, reference_version)

if TYPE_CHECKING:  # the registry pulls in torch and transformers
    from promcse.serving.registry import PromptRegistry

LOCK_TIMEOUT_S = 30.0
PROBE_TEXTS = ["A man is playing a guitar.", "x"]
STORABLE = ("checkpoint", "roles", "peft")

__all__ = ["NAME_RE", "PromptStore", "StoredPrompt", "check_storable", "own_bytes", "reference_version"]


def own_bytes(model: Any) -> int:
    """Bytes of a loaded prompt's own tensors (prompt and head of each role; never the shared backbone)."""
    encoders = list(model.roles.values()) if hasattr(model, "roles") else [model]
    total = 0
    for encoder in encoders:
        for module in (encoder.prompt, encoder.head):
            if module is not None:
                total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return total


def check_storable(folder: Path) -> None:
    """Refuse a folder the store cannot serve: only prompt checkpoints, role pairs and PEFT adapters.

    Raises:
        PromcseError: A full fine-tune, a released checkpoint, a bare backbone or anything else.
    """
    from promcse.models.checkpoint import read_spec
    from promcse.models.loading import kind_of

    kind = kind_of(str(folder))
    if kind not in STORABLE or (kind == "checkpoint" and read_spec(folder).mode == "full"):
        what = "a full fine-tune" if kind == "checkpoint" else f"a {kind}"
        raise PromcseError(f"the prompt store holds prompt checkpoints, role pairs and PEFT prefix adapters "
                           f"over a shared backbone, not {what} (config.json must say format "
                           f"'promcse-checkpoint'); serve other models by name at start-up")


@dataclass(frozen=True)
class StoredPrompt:
    """A loaded prompt: its name, version, the encoder (or role pair), its own tensors' bytes, its folder stamp."""

    name: str
    version: str
    model: Any
    nbytes: int
    stamp: Stamp


class PromptStore:
    """Prompts of one folder, loaded lazily over ``registry``'s shared backbones, LRU-cached under a byte budget.

    Thread-safe; loads and writes run one at a time (the server calls the blocking methods off its event loop).

    Args:
        root: The store folder (must exist).
        registry: Whose backbone cache the prompts load over.
        budget_bytes: Most bytes of prompt + head tensors kept loaded.
    """

    def __init__(self, root: str | Path, registry: PromptRegistry, budget_bytes: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise PromcseError("prompt store folder does not exist", path=self.root, key="prompts")
        if budget_bytes < 0:
            raise PromcseError(f"must be at least 0, got {budget_bytes}", key="prompt_cache_mb")
        self.registry, self.budget_bytes = registry, budget_bytes
        self._cache: OrderedDict[str, StoredPrompt] = OrderedDict()
        self._versions: dict[str, tuple[Stamp, str]] = {}
        self._lock, self._load_lock = threading.Lock(), threading.RLock()
        self.loads = self.evictions = 0
        self.recover()

    # ---- reading ------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The store's prompt names, sorted: valid names of sub-folders holding a model's marker file (hidden and
        temporary entries skipped; nothing is loaded)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if NAME_RE.match(e.name) and is_prompt_folder(Path(e.path)))

    def has(self, name: str) -> bool:
        """True when ``name`` is one of :meth:`names` (nothing is loaded)."""
        return bool(NAME_RE.match(name)) and is_prompt_folder(self.root / name)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the prompts loaded now."""
        with self._lock:
            return sum(p.nbytes for p in self._cache.values())

    def loaded(self) -> list[str]:
        """Names loaded now, least recently used first."""
        with self._lock:
            return list(self._cache)

    def peek(self, name: str) -> StoredPrompt | None:
        """The loaded prompt when its folder has not changed since it was loaded (marked used); else None."""
        with self._lock:
            hit = self._cache.get(name)
        if hit is None or folder_stamp(self.root / name) != hit.stamp:
            return None
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
        return hit

    def acquire(self, name: str) -> StoredPrompt | None:
        """The prompt ``name``, loaded (or reloaded when its folder changed) if needed; None when not in the store.

        Raises:
            PromcseError: The folder is in the store but does not load.
        """
        if not NAME_RE.match(name):
            return None
        hit = self.peek(name)
        if hit is not None:
            return hit
        with self._load_lock:  # one load at a time; another thread may have loaded it meanwhile
            hit = self.peek(name)
            if hit is not None:
                return hit
            loaded = self._read(name)
            if loaded is None:
                self._forget(name)
                return None
            self._install(loaded)
            return loaded

    def version(self, name: str) -> str | None:
        """The version of prompt ``name`` (hashed once per folder change), None when not in the store."""
        folder = self.root / name
        stamp = folder_stamp(folder) if self.has(name) else None
        if stamp is None:
            return None
        known = self._versions.get(name)
        if known is not None and known[0] == stamp:
            return known[1]
        version = folder_version(folder)
        if folder_stamp(folder) == stamp:
            self._versions[name] = (stamp, version)
        return version

    def describe(self, name: str) -> dict[str, Any] | None:
        """``{"name", "version", "loaded", "bytes"}`` (bytes: None until loaded); None when not in the store."""
        version = self.version(name)
        if version is None:
            return None
        with self._lock:
            hit = self._cache.get(name)
        live = hit is not None and hit.version == version
        return {"name": name, "version": version, "loaded": live, "bytes": hit.nbytes if live and hit else None}

    def _read(self, name: str) -> StoredPrompt | None:
        """Load the folder as it is now; retried when it changes under the load (another process's write)."""
        folder = self.root / name
        for _ in range(3):
            before = folder_stamp(folder)
            if before is None or not is_prompt_folder(folder):
                return None
            try:
                version, model = folder_version(folder), self.validate(folder)
            except (PromcseError, OSError):
                if folder_stamp(folder) != before:
                    continue
                raise
            if folder_stamp(folder) == before:
                self.loads += 1
                return StoredPrompt(name, version, model, own_bytes(model), before)
        raise PromcseError(f"prompt {name!r} kept changing while it was loaded; try again")

    # ---- the cache ----------------------------------------------------------------------------------

    def _install(self, prompt: StoredPrompt) -> None:
        """Put a loaded prompt in the cache (replacing its old version), then evict down to the budget."""
        with self._lock:
            self._cache.pop(prompt.name, None)
            self._cache[prompt.name] = prompt
            self._versions[prompt.name] = (prompt.stamp, prompt.version)
            total = sum(p.nbytes for p in self._cache.values())
            while self._cache and total > self.budget_bytes:
                _, evicted = self._cache.popitem(last=False)
                total -= evicted.nbytes
                self.evictions += 1

    def _forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)
            self._versions.pop(name, None)

    # ---- writing ------------------------------------------------------------------------------------

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """This process's write lock, then the store's lock file (other processes' writes and start-up)."""
        from filelock import FileLock, Timeout

        with self._load_lock:
            lock = FileLock(str(self.root / ".promcse.lock"))
            try:
                lock.acquire(timeout=LOCK_TIMEOUT_S)
            except Timeout:
                raise PromcseError(f"another process has been writing the prompt store for {LOCK_TIMEOUT_S:g} s; "
                                   "try again later", key="store_busy") from None
            try:
                yield
            finally:
                lock.release()

    def validate(self, folder: Path, new_backbones: bool = True) -> Any:
        """Load ``folder`` as the store would and probe it (finite vectors for two texts); the loaded model.

        ``new_backbones=False`` for uploads: a backbone the registry does not hold yet is refused (a folder an
        operator put in the store may load any backbone; an admin key may not make the server load one).

        Raises:
            PromcseError: Not storable, does not load (bad JSON, shapes, dtypes...), non-finite vectors, or (uploads)
                a backbone not held.
        """
        import numpy as np

        check_storable(folder)
        model = self.registry.load_unlisted(str(folder), new_backbones=new_backbones)
        for encoder in (model.roles.values() if hasattr(model, "roles") else [model]):
            vectors = np.asarray(self.registry.encode(PROBE_TEXTS, encoder, normalize=False))
            if not np.isfinite(vectors).all():
                raise PromcseError("the prompt produces NaN or infinite embeddings")
        return model

    def put(self, name: str, files: Mapping[str, bytes]) -> tuple[StoredPrompt, bool]:
        """Add or replace prompt ``name`` with ``files`` ({relative path: bytes}); (the prompt, whether it replaced one).

        The files are written and validated (:meth:`validate`) in a hidden temporary folder, then swapped in;
        the new version is what the next request gets, while requests already holding the old one finish with it.

        Raises:
            PromcseError: Bad name (``key="name"``), bad file names (``key="files"``), a model that does not load
                (nothing changed), or the lock held elsewhere for :data:`LOCK_TIMEOUT_S` (``key="store_busy"``).
        """
        from promcse.io.files import atomic_directory

        check_name(name)
        check_files(files)
        built: dict[str, Any] = {}

        def fill(tmp: Path) -> None:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            built["model"] = self.validate(tmp, new_backbones=False)  # an upload: only backbones held already

        with self._write_lock():
            replaced = (self.root / name).exists()
            atomic_directory(self.root / name, fill)
            folder = self.root / name
            stamp, version = folder_stamp(folder), folder_version(folder)
            prompt = StoredPrompt(name, version, built["model"], own_bytes(built["model"]), stamp or ())
            self._install(prompt)
        return prompt, replaced

    def delete(self, name: str) -> bool:
        """Remove prompt ``name`` from the folder and the cache; False when it is not in the store."""
        import shutil
        import uuid

        if not NAME_RE.match(name):
            return False
        with self._write_lock():
            folder = self.root / name
            if not folder.is_dir():
                self._forget(name)
                return False
            aside = self.root / f".{name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(folder, aside)  # gone at once for every process; the files are removed after
            self._forget(name)
            shutil.rmtree(aside, ignore_errors=True)
        return True

    def recover(self) -> None:
        """Clean what a crashed write left (:func:`promcse.serving.prompt_files.recover_store`), under the lock."""
        with self._write_lock():
            recover_store(self.root)
