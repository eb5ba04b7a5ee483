"""Sharing models on the Hugging Face Hub: :func:`save_pretrained` (a checkpoint plus its model card) and
:func:`push_to_hub` (what ``promcse push DIR org/name`` runs).

Loading goes the other way, through :func:`promcse.load` with an ``org/name`` reference
(:mod:`promcse.models.hub_resolve`: the cache first, then the Hub unless ``HF_HUB_OFFLINE`` is set). The card is
:mod:`promcse.models.model_card`'s. A checkpoint references its frozen backbone by the name it records: a Hub id or
``minilm`` loads anywhere, a local path only where it exists (:func:`portability_warning` says so).

``push_to_hub`` is tested against a local stand-in for the Hub (``HfApi.create_repo``/``upload_folder`` replaced by
a copy into a cache-shaped folder), not against huggingface.co.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from promcse.encoder.model import SentenceEncoder
from promcse.errors import PromcseError
from promcse.models.checkpoint import save_checkpoint
from promcse.models.hub_resolve import hub_offline, is_hub_id
from promcse.models.model_card import CARD_FILE, base_model_id, folder_facts, write_card

# What a run or checkpoint folder may hold that is not the model: training states, locks and temporaries, logs
UPLOAD_IGNORE = ["state-*", ".*", "*/.*", "tensorboard/*", "*.tmp"]
DEFAULT_COMMIT_MESSAGE = "Upload promcse model"


def save_pretrained(encoder: SentenceEncoder, directory: str | Path, card: bool = True, *,
                    repo_id: str | None = None, license: str | None = None, datasets: list[str] | None = None,
                    results: Any = None) -> Path:
    """Save ``encoder`` as a promcse checkpoint in ``directory``, with a Hub model card (``README.md``).

    The folder loads with ``promcse.load(directory)``, and, once uploaded (``promcse push``), with
    ``promcse.load("org/name")``.

    Args:
        encoder: The encoder to save.
        directory: Created if needed; an existing checkpoint there is overwritten.
        card: Write ``README.md`` (see :func:`promcse.models.model_card.build_card`).
        repo_id: The Hub id it will be published as (names the model in the card).
        license: Hub license id (default: the backbone's when known).
        datasets: Hub ids of the training data.
        results: One model's ``promcse eval --json`` results for the card's evaluation.

    Returns:
        The directory.

    Raises:
        PromcseError: ``encoder`` is not a :class:`promcse.encoder.model.SentenceEncoder`, or bad ``results``.
    """
    if not isinstance(encoder, SentenceEncoder):
        raise PromcseError(f"expected a SentenceEncoder, got {type(encoder).__name__} (a role pair is saved with "
                           "promcse.models.roles.save_roles from its checkpoint folders)", key="encoder")
    out = save_checkpoint(encoder, directory)
    if card:
        write_card(out, repo_id=repo_id, license=license, datasets=datasets, results=results)
    return out


def portability_warning(directory: str | Path) -> str | None:
    """Why a model folder would not load elsewhere (its backbone is a local path), or None."""
    facts = folder_facts(directory)
    if facts.mode == "full" or base_model_id(facts.backbone) is not None:
        return None
    return (f"the backbone is recorded as the local path '{facts.backbone}': the model will load only where that "
            "path exists; to share it, train or save it over a backbone named by its Hub id")


def check_model_folder(directory: str | Path) -> Path:
    """``directory`` if it is a promcse model folder that loads (checkpoint, role pair or PEFT prefix adapter).

    Raises:
        PromcseError: Not such a folder, or it does not load (naming the file or backbone at fault).
    """
    from promcse.models.loading import load

    folder = Path(directory)
    if not folder.is_dir():
        raise PromcseError("not a directory", path=folder, key="directory")
    folder_facts(folder)
    load(str(folder), device="cpu")
    return folder


def _hub_failure(repo_id: str, err: BaseException) -> PromcseError:
    lines = str(err).strip().splitlines()
    detail = f"{type(err).__name__}: {lines[0] if lines else ''}"
    advice = ("HF_HUB_OFFLINE is set: unset it to push" if hub_offline() else
              "check that HF_TOKEN (or the token given) can write to it, the network and HF_ENDPOINT")
    return PromcseError(f"cannot push to the Hugging Face Hub repository '{repo_id}' ({detail}); {advice}",
                        key="repo_id")


def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
                card_options: dict[str, Any] | None = None) -> Any:
    """Upload a promcse model folder to the Hub repository ``repo_id`` (created if needed).

    The folder is first checked to load (:func:`check_model_folder`); a ``README.md`` model card is written into
    it when it has none. Training states, hidden files and TensorBoard logs are not uploaded (:data:`UPLOAD_IGNORE`).

    Args:
        directory: A checkpoint, role pair or PEFT prefix adapter folder.
        repo_id: ``org/name``.
        private: Create the repository as private (an existing one keeps its visibility).
        token: A Hub token with write access (default: ``HF_TOKEN`` or the stored login).
        revision: A branch to push to (created if needed; default ``main``).
        commit_message: Default :data:`DEFAULT_COMMIT_MESSAGE`.
        endpoint: The Hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).
        card_options: ``license``, ``datasets`` or ``results`` for a card written here.

    Returns:
        ``huggingface_hub.CommitInfo`` of the upload.

    Raises:
        PromcseError: A bad repository id or folder, or the Hub refusing or unreachable (naming the repository).
    """
    from huggingface_hub import HfApi

    if not is_hub_id(repo_id):
        raise PromcseError(f"expected a Hub repository id 'owner/name', got {repo_id!r}", key="repo_id")
    folder = check_model_folder(directory)
    if not (folder / CARD_FILE).exists():
        write_card(folder, repo_id=repo_id, **(card_options or {}))
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type="model",
                                 commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, ignore_patterns=UPLOAD_IGNORE)
    except Exception as err:  # noqa: BLE001 - every way the Hub can refuse (HTTP, auth, proxy) is one user error
        raise _hub_failure(repo_id, err) from None
