"""What identifies an encoder's *document* vectors: the model half of the retrieval embedding cache's key.

:func:`document_fingerprint` hashes only what changes the vectors an encoder gives documents:

- the backbone: for a frozen backbone (prompt and frozen modes), the sha256 of its files (config, weights,
  tokenizer: :func:`files_digest`, computed once per directory and process and redone when a file's size or
  time changes); for a full fine-tune, or a backbone that is not a local folder, the bytes of its weights in memory;
- the deep prompt's spec and weights, when the encoder has a prompt;
- the pooler, the MLP head's weights when the head applies at inference (``always``), the weights' dtype;
- the token limit (``max_length``).

Names and paths are not part of it, so ``minilm`` and the folder it resolves to are the same model. A
query-side-only adaptation (queries through a prompt, documents through the frozen backbone) passes the frozen
backbone as its document encoder: its document vectors, and so its cache entry, are the frozen backbone's own.
An :class:`promcse.models.onnx_runtime.OnnxEncoder` is identified by its export's files and its prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from promcse.encoder.backbone import resolve_backbone
from promcse.io.files import sha256_file

# The files of a Hugging Face model folder that decide its vectors (top level only; README and the like are not).
MODEL_FILES: tuple[str, ...] = (
    "config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "*.model",
)
_DIGESTS: dict[str, tuple[tuple[Any, ...], str]] = {}  # resolved folder -> (file stats, digest), this process


def _model_files(directory: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The regular files of ``directory`` (top level) matching ``patterns``, sorted by name."""
    found = {p for pattern in patterns for p in directory.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def files_digest(directory: str | Path, patterns: tuple[str, ...] = MODEL_FILES) -> str:
    """sha256 over the names and sha256s of a folder's model files; cached per folder in this process.

    The cached value is reused while every file keeps its size and modification time.
    """
    root = Path(directory).resolve()
    files = _model_files(root, patterns)
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    cached = _DIGESTS.get(str(root))
    if cached is not None and cached[0] == stats:
        return cached[1]
    digest = _sha256_json([[p.name, sha256_file(p)] for p in files])
    _DIGESTS[str(root)] = (stats, digest)
    return digest


def tensors_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode("utf-8"))
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def _backbone_digest(encoder: Any) -> str:
    """The frozen backbone's files, or its weights in memory (a full fine-tune, a hub name)."""
    if encoder.spec.mode != "full":
        folder = Path(resolve_backbone(encoder.spec.backbone))
        if folder.is_dir() and (folder / "config.json").is_file():
            return "files:" + files_digest(folder)
    vocab = sorted(encoder.tokenizer.get_vocab().items())
    return "weights:" + _sha256_json([tensors_digest(encoder.backbone), type(encoder.tokenizer).__name__, vocab])


def _onnx_fingerprint(encoder: Any, max_length: int | None) -> str:
    """An ONNX export: the sha256 of its files, the prompt, the token limit."""
    files = sorted(p for p in Path(encoder.directory).rglob("*") if p.is_file())
    listing = [[str(p.relative_to(encoder.directory)), sha256_file(p)] for p in files]
    limit = min(max_length or encoder.max_length, encoder.max_length)
    return _sha256_json({"onnx": listing, "prompt": encoder.prompt, "max_length": limit})


def document_fingerprint(encoder: Any, max_length: int | None = None) -> str:
    """The identity of the vectors ``encoder`` gives documents (see the module docstring), as a hex sha256.

    Args:
        encoder: A :class:`promcse.encoder.model.SentenceEncoder` or :class:`promcse.models.onnx_runtime.OnnxEncoder`.
        max_length: The token limit documents are encoded with (None: the encoder's own).
    """
    if not hasattr(encoder, "spec"):
        return _onnx_fingerprint(encoder, max_length)
    spec = encoder.spec
    prompt = None
    if encoder.prompt is not None:
        prompt = [_sha256_json(spec.to_dict().get("prompt")), tensors_digest(encoder.prompt)]
    head = tensors_digest(encoder.head) if encoder.head is not None and spec.head == "always" else None
    dtype = str(next(encoder.backbone.parameters()).dtype)
    limit = min(max_length or encoder.max_length, encoder.max_length)
    parts = {"backbone": _backbone_digest(encoder), "prompt": prompt, "pooler": spec.pooler, "head": head,
             "dtype": dtype, "max_length": limit, "normalized": True}
    return _sha256_json(parts)

