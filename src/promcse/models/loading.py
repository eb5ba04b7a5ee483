"""What a model reference means, in one place: ``promcse.load``, the registry, search and export all use it.

A reference is, in this order of precedence:

1. a promcse checkpoint directory (``config.json`` with ``format: promcse-checkpoint``): its encoder spec
   names the backbone, which is loaded (or shared, see ``backbones``) and gets the stored prompt and head;
   a ``full`` fine-tune carries its own backbone under ``backbone/``;
2. a checkpoint in the PromCSE authors' released format (a Hugging Face directory whose weights hold
   ``prefix_encoder.*``; see :mod:`promcse.models.released`), or any directory when ``pooler``/``prompt_length``
   are given;
3. a role pair (a directory with ``roles.json``, see :mod:`promcse.models.roles`): a
   :class:`promcse.models.roles.RoleEncoder` whose query and document roles share one backbone (torch only);
4. a PEFT prefix-tuning adapter (a directory with ``adapter_config.json``, see :mod:`promcse.models.peft_adapter`):
   its prefix over the base model it names (``base_model_name_or_path``, loaded through ``backbones``), mean pooling;
5. ``minilm`` (the bundled all-MiniLM-L6-v2), a Hugging Face name or a local model directory: the bare
   encoder, frozen, with mean pooling (sentence-transformers' setting for MiniLM).

A Hub id (``org/name``, not an existing local path) is first resolved to its local snapshot folder by
:func:`promcse.models.hub_resolve.resolve_reference` (the cache first, then the Hub unless offline mode is set),
which is then read as above; a bare backbone keeps the Hub id as its recorded name. A backbone that a checkpoint or
adapter names by Hub id is loaded by transformers as before; failing that, the error names the offline setting.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, overload

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.encoder.backbone import MINILM, load_backbone, resolve_backbone, resolve_device
from promcse.models.checkpoint import is_checkpoint, load_checkpoint, read_spec
from promcse.models.hub_resolve import explain_hub_backbones, resolve_reference
from promcse.errors import PromcseError
from promcse.encoder.model import SentenceEncoder, build_encoder, default_spec
from promcse.models.onnx_runtime import BACKENDS, OnnxEncoder, is_onnx_export, load_onnx
from promcse.models.peft_adapter import is_peft_adapter, load_peft_adapter
from promcse.models.released import alias_prompt_length, is_released, load_released
from promcse.models.roles import RoleEncoder, is_role_pair, load_roles

BackboneSource = Callable[[str], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def backbone_key(name_or_path: str) -> str:
    """Identity of a backbone: the real path of a local directory (``minilm`` resolved), else the name."""
    resolved = resolve_backbone(name_or_path)
    path = Path(resolved)
    return str(path.resolve()) if path.is_dir() else resolved


def reference_key(model_ref: str) -> str:
    """Comparable form of a model reference (existing paths resolved)."""
    path = Path(model_ref)
    return str(path.resolve()) if path.exists() else model_ref


def kind_of(model_ref: str, pooler: str | None = None, prompt_length: int | None = None) -> str:
    """``checkpoint``, ``roles``, ``peft``, ``released`` or ``backbone``: how :func:`load` reads ``model_ref``.

    Raises:
        PromcseError: A path that exists but is none of these.
    """
    if is_checkpoint(model_ref):
        return "checkpoint"
    if is_role_pair(model_ref):
        return "roles"
    if is_peft_adapter(model_ref):
        return "peft"
    if pooler is not None or prompt_length is not None or is_released(model_ref):
        return "released"
    path = Path(model_ref)
    if model_ref != MINILM and path.exists() and not (path / "config.json").is_file():
        raise PromcseError("neither a promcse checkpoint nor a Hugging Face model directory", path=model_ref)
    return "backbone"


@overload
def load(model: str | Path, device: str = ..., pooler: str | None = ..., prompt_length: int | None = ...,
         backbones: BackboneSource | None = ..., backend: Literal["torch"] = ...,
         pre_seq_len: int | None = ...) -> SentenceEncoder | RoleEncoder: ...
@overload
def load(model: str | Path, device: str = ..., pooler: str | None = ..., prompt_length: int | None = ...,
         backbones: BackboneSource | None = ..., *, backend: str,
         pre_seq_len: int | None = ...) -> SentenceEncoder | RoleEncoder | OnnxEncoder: ...
def load(model: str | Path, device: str = "auto", pooler: str | None = None, prompt_length: int | None = None,
         backbones: BackboneSource | None = None, backend: str = "torch",
         pre_seq_len: int | None = None) -> SentenceEncoder | RoleEncoder | OnnxEncoder:
    """Load an encoder from any model reference (see the module docstring), in eval mode on ``device``.

    Args:
        model: The reference; a Hub id ``org/name`` resolves through the Hub cache (see the module docstring).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        pooler: For released-format directories without a recorded pooler, and PEFT adapters (default ``avg``).
        prompt_length: Prompt length of a released checkpoint or PEFT adapter (checked against its weights).
        backbones: Where frozen backbones come from (default: load a fresh copy); the registry passes its
            cache so that prompts over one backbone share it. It is given the name a checkpoint or adapter
            records, so it can also stand a local copy in for that name. Full fine-tunes and released
            checkpoints always carry their own weights.
        backend: ``torch``, or ``onnx``: an :class:`promcse.models.onnx_runtime.OnnxEncoder` (CPU) of an ONNX export
            directory, or of any other reference exported once into a cache folder.
        pre_seq_len: The reference code's name for ``prompt_length`` (a documented alias).

    Raises:
        PromcseError: If the model cannot be found or loaded, or does not fit its backbone; a Hub id that is
            neither cached nor downloadable is named with the offline setting (``HF_HUB_OFFLINE``).
    """
    name, source = str(model), explain_hub_backbones(backbones or load_backbone)
    ref = resolve_reference(name)
    prompt_length = alias_prompt_length(prompt_length, pre_seq_len)
    if is_role_pair(ref):
        if backend != "torch":
            raise PromcseError("a role pair (roles.json) loads with the torch backend only; export each role's "
                               "checkpoint to ONNX on its own", path=ref, key="backend")
        return load_roles(ref, source).eval().to(resolve_device(device))
    if backend != "torch" or is_onnx_export(ref):
        return _load_onnx(ref, device, backend, pooler, prompt_length)
    target = resolve_device(device)
    kind = kind_of(ref, pooler, prompt_length)
    if kind == "checkpoint":
        spec = read_spec(ref)
        if spec.mode == "full":
            encoder = load_checkpoint(ref)
        else:
            backbone, tokenizer = source(spec.backbone)
            encoder = load_checkpoint(ref, backbone=backbone, tokenizer=tokenizer)
    elif kind == "peft":
        encoder = load_peft_adapter(ref, source, pooler=pooler, prompt_length=prompt_length)
    elif kind == "released":
        encoder = load_released(ref, pooler=pooler, prompt_length=prompt_length)
    else:
        backbone, tokenizer = source(ref)
        encoder = build_encoder(default_spec(name, backbone), backbone, tokenizer)  # a Hub id stays its name
    return encoder.eval().to(target)


def _load_onnx(ref: str, device: str, backend: str, pooler: str | None, prompt_length: int | None) -> OnnxEncoder:
    """``load(..., backend="onnx")``; an ONNX export asked for with the torch backend is refused."""
    if backend not in BACKENDS:
        raise PromcseError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}", key="backend")
    if backend == "torch":
        raise PromcseError(f"{ref} is an ONNX export: load it with backend 'onnx'", key="backend")
    return load_onnx(ref, lambda r: load(r, device="cpu", pooler=pooler, prompt_length=prompt_length), device=device,
                     options={"pooler": pooler, "prompt_length": prompt_length})
