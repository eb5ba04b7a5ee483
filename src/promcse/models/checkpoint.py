"""Checkpoints: ``config.json`` + ``prompt.safetensors`` (+ the backbone only in ``full`` mode) + ``canary.json``.

The frozen backbone is referenced by name or path, never copied. ``canary.json`` holds the encoder's vectors of a
few fixed sentences (:mod:`promcse.models.canary`); loading recomputes them and refuses a checkpoint that no longer
gives them (another backbone of the same shape, damaged weights, changed code). Every file is written to a
temporary name in the same directory, fsynced and renamed, so an interrupted save leaves the
previous checkpoint intact. Loading reads only JSON and safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from promcse.encoder.backbone import check_prompt_support, family_of
from promcse.errors import PromcseError
from promcse.io.files import atomic_write, atomic_write_text
from promcse.io.schema import MAX_CONFIG_BYTES, read_json_object, read_regular_file, safetensors_header
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.models.canary import check_canaries, write_canaries

FORMAT = "promcse-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "prompt.safetensors"
BACKBONE_DIR = "backbone"


def versions() -> dict[str, str]:
    """Library versions recorded in every checkpoint."""
    import transformers

    from promcse.version import __version__

    return {"promcse": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def trainable_state(encoder: SentenceEncoder) -> dict[str, torch.Tensor]:
    """Prompt and head tensors (what a prompt checkpoint stores)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in (("prompt.", encoder.prompt), ("head.", encoder.head)):
        if module is not None:
            state.update({prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    return state


def save_checkpoint(encoder: SentenceEncoder, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save an encoder to ``directory`` (created if needed); returns the directory.

    ``config.json`` is written last, so a directory with a config always has complete weights and canary vectors
    (computed from ``encoder`` in eval mode; its train/eval flags are left as they were, so the loop can save
    mid-training).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = trainable_state(encoder)
    if state:
        atomic_write(out / WEIGHTS_FILE, lambda tmp: safetensors.torch.save_file(state, str(tmp)))
    if encoder.spec.mode == "full":
        backbone_dir = out / BACKBONE_DIR
        encoder.backbone.save_pretrained(str(backbone_dir), safe_serialization=True)
        encoder.tokenizer.save_pretrained(str(backbone_dir))
    write_canaries(encoder, out)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": encoder.spec.to_dict(), "versions": versions()}
    meta.update(extra or {})
    atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2, default=str))
    return out


def is_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a directory whose ``config.json`` says ``format: promcse-checkpoint``.

    A config that cannot be read is reported by :func:`read_spec`, not hidden: a regular ``config.json``
    whose text mentions the format counts as a checkpoint so that its errors surface.
    """
    config = Path(path) / CONFIG_FILE
    try:
        raw = read_regular_file(config, MAX_CONFIG_BYTES)
    except PromcseError:
        return False
    try:
        return json.loads(raw.decode("utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return FORMAT.encode() in raw


def read_spec(directory: str | Path) -> EncoderSpec:
    """Read and validate a checkpoint's encoder spec (types, ranges, cross-field rules; nothing is built)."""
    path = Path(directory) / CONFIG_FILE
    meta = read_json_object(path)
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PromcseError(f"expected int, got {version!r}", path=path, key="format_version")
    if version > FORMAT_VERSION:
        raise PromcseError("checkpoint written by a newer promcse; upgrade to load it", path=path)
    try:
        spec = EncoderSpec.from_dict(meta.get("encoder"))
    except PromcseError as err:
        raise PromcseError(err.message, path=path, key=err.key) from None
    try:
        family_of(spec.shape.model_type)
        if spec.prompt is not None:
            check_prompt_support(spec.shape.model_type)
    except PromcseError as err:
        raise PromcseError(err.message, path=path, key="encoder.shape.model_type") from None
    return spec


def load_weights(encoder: SentenceEncoder, directory: str | Path) -> None:
    """Load prompt/head tensors into an encoder built from the same spec; shapes must match exactly."""
    path = Path(directory) / WEIGHTS_FILE
    expected = trainable_state(encoder)
    if not expected:
        return
    if not path.exists():
        raise PromcseError("missing prompt weights", path=path)
    header = safetensors_header(path)  # names, dtypes, shapes and byte ranges checked before reading data
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise PromcseError(f"weights do not match the config: missing {missing}, unexpected {unexpected}", path=path)
    for key, (_, shape) in header.items():
        if shape != tuple(expected[key].shape):
            raise PromcseError(f"tensor '{key}' has shape {shape}, config implies {tuple(expected[key].shape)}", path=path)
    try:
        state = {k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged data
        raise PromcseError(f"cannot read the tensors: {str(err).splitlines()[0]}", path=path) from None
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise PromcseError(f"tensor(s) {bad} hold NaN or infinite values", path=path)
    for prefix, module in (("prompt.", encoder.prompt), ("head.", encoder.head)):
        if module is not None:
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(sub)


def load_checkpoint(directory: str | Path, backbone: Any = None, tokenizer: Any = None) -> SentenceEncoder:
    """Rebuild an encoder from a checkpoint directory, optionally onto an already loaded backbone.

    The encoder comes back in eval mode, its prompt and head on the backbone's device, once its canary vectors
    (``canary.json``) are checked: one forward pass of a few short sentences.

    Raises:
        PromcseError: Unreadable config, a backbone whose shape differs from the recorded one, weights that do
            not match the config, or canary vectors that differ from the recorded ones (or a malformed
            ``canary.json``).
    """
    spec = read_spec(directory)
    if spec.mode == "full":
        from promcse.encoder.backbone import load_backbone

        backbone, tokenizer = load_backbone(str(Path(directory) / BACKBONE_DIR))
    try:
        encoder = build_encoder(spec, backbone, tokenizer)
    except PromcseError as err:
        if err.path is not None:
            raise
        raise PromcseError(err.message, path=Path(directory) / CONFIG_FILE, key=err.key) from None
    load_weights(encoder, directory)
    encoder.eval().to(encoder.device)  # a shared backbone may already sit on another device
    check_canaries(encoder, directory, _stored_files(encoder))
    return encoder


def _stored_files(encoder: SentenceEncoder) -> str:
    """The files of a checkpoint that a canary mismatch may point at (``backbone/ or prompt.safetensors or ...``)."""
    files = [f"{BACKBONE_DIR}/"] if encoder.spec.mode == "full" else []
    files += [WEIGHTS_FILE] if encoder.prompt is not None or encoder.head is not None else []
    return " or ".join([*files, CONFIG_FILE])
