"""Model references on the Hugging Face Hub: ``promcse.load("org/name")`` through ``huggingface_hub``'s cache.

A reference that is not an existing local path and looks like a Hub repository id (``org/name``) is resolved to a
local snapshot folder, which :func:`promcse.models.loading.load` then reads like any local reference (checkpoint,
role pair, PEFT adapter, released checkpoint or plain backbone):

1. the local cache first (``snapshot_download(..., local_files_only=True)``), so a downloaded model never needs
   the network;
2. then the Hub, unless offline mode is set (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), skipping the weights
   of other frameworks (:data:`IGNORE_PATTERNS`).

promcse never sets offline mode itself. When neither step finds the repository the error names it, the cache
folder, and whether offline mode is set, with how to fix it. The environment is read when a reference is resolved
(not when ``huggingface_hub`` was imported), so ``HF_HUB_CACHE``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` set later in
the process count.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
# Files of other frameworks and runtimes that promcse never reads (a Hub repository often carries several copies)
IGNORE_PATTERNS = ["*.h5", "*.msgpack", "*.ot", "*.tflite", "*.gguf", "*.mlmodel", "tf_model*", "flax_model*",
                   "onnx/*", "openvino/*", "coreml/*"]


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` has the form of a Hub model id with an owner, ``org/name`` (a local path is not asked)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.count("/") != 1 or ref.startswith((".", "/", "~")) or "\\" in ref:
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """Whether Hub offline mode is set: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` now, or when it was imported."""
    from huggingface_hub import constants

    now = any(os.environ.get(name, "").strip().upper() in TRUE_VALUES for name in OFFLINE_VARIABLES)
    return now or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hub cache folder as the environment names it now: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else the
    default of ``huggingface_hub``."""
    from huggingface_hub import constants

    named = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if named:
        return Path(os.path.expandvars(named)).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def offline_advice(repo_id: str) -> str:
    """What the offline setting means for ``repo_id`` and how to get it, for an error message."""
    if hub_offline():
        return (f"HF_HUB_OFFLINE is set, so only the local cache ({hub_cache_dir()}) was searched. Download it "
                f"once with network access (huggingface_hub.snapshot_download({repo_id!r}) or "
                f"'hf download {repo_id}'), unset HF_HUB_OFFLINE, or give a local path")
    return ("HF_HUB_OFFLINE is not set, so the Hub was asked. Check the name, the network (HF_ENDPOINT) and, "
            "for a private or gated repository, HF_TOKEN; or give a local path")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of the Hub model ``repo_id``: from the cache, else downloaded (unless offline).

    Args:
        repo_id: ``org/name``.
        revision: A branch, tag or commit (default: ``main``).

    Raises:
        PromcseError: The repository is neither cached nor downloadable, naming it and the offline setting.
    """
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or cached incompletely
        pass
    if hub_offline():
        raise PromcseError(f"'{repo_id}' is not a local path, and the Hugging Face Hub model '{repo_id}' is not in "
                           f"the local cache: {offline_advice(repo_id)}", key="model")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, ignore_patterns=IGNORE_PATTERNS))
    except Exception as err:  # noqa: BLE001 - every way the Hub can fail (HTTP, proxy, disk) is one user error
        raise PromcseError(f"'{repo_id}' is not a local path, and the Hugging Face Hub model '{repo_id}' could not be "
                           f"downloaded ({_first_line(err)}). {offline_advice(repo_id)}", key="model") from None


def resolve_reference(ref: str) -> str:
    """``ref`` as a local reference: a Hub id (not an existing path, not ``minilm``) becomes its snapshot folder;
    everything else is returned unchanged."""
    if Path(ref).exists() or not is_hub_id(ref):
        return ref
    return str(resolve_hub(ref))


def explain_hub_backbones(source: Callable[[str], Any]) -> Callable[[str], Any]:
    """``source`` (a backbone loader), whose failure to load a Hub-named backbone also says what the offline
    setting did: the name a checkpoint records is given to transformers as before, only the error is clearer."""

    def load(name: str) -> Any:
        try:
            return source(name)
        except PromcseError as err:
            if not err.message.startswith("cannot load backbone") or Path(name).exists() or not is_hub_id(name):
                raise
            raise PromcseError(f"{err.message}. '{name}' is a Hugging Face Hub model: {offline_advice(name)}",
                               path=err.path, key=err.key) from None

    return load
