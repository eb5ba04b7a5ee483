"""Encoding texts to vectors, and resolving what a user means by a model name.

Texts are sorted by length so each batch pads to similar lengths, encoded under
``torch.inference_mode``, and returned in the caller's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from promcse.backbone import MINILM, load_backbone
from promcse.checkpoint import is_checkpoint, load_checkpoint
from promcse.errors import PromcseError
from promcse.model import SentenceEncoder, default_spec, build_encoder


def load(model: str | Path, device: str = "auto") -> SentenceEncoder:
    """Load an encoder: a promcse checkpoint directory, ``minilm``, or any HF name or local path.

    A bare backbone is used frozen with mean pooling (sentence-transformers' setting for MiniLM).

    Raises:
        PromcseError: If the model cannot be found or loaded.
    """
    name = str(model)
    if is_checkpoint(name):
        encoder = load_checkpoint(name)
    else:
        if name != MINILM and Path(name).exists() and not (Path(name) / "config.json").is_file():
            raise PromcseError("neither a promcse checkpoint nor a Hugging Face model directory", path=name)
        backbone, tokenizer = load_backbone(name)
        encoder = build_encoder(default_spec(name, backbone), backbone, tokenizer)
    encoder.eval()
    return encoder.to(resolve_device(device))


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def length_order(encoder: SentenceEncoder, texts: list[str]) -> np.ndarray:
    """Indices sorting texts longest first (by character length: cheap and close to token length)."""
    return np.argsort([-len(t) for t in texts], kind="stable")


def encode_texts(
    encoder: SentenceEncoder,
    texts: list[str],
    batch_size: int = 64,
    normalize: bool = False,
    output: Literal["numpy", "torch"] = "numpy",
    show_progress: bool = False,
    max_length: int | None = None,
) -> np.ndarray | torch.Tensor:
    """Encode texts into an (N, D) array in input order.

    Args:
        encoder: The encoder (switched to eval mode for the call and restored after).
        texts: Input texts.
        batch_size: Texts per forward pass.
        normalize: L2-normalise the vectors.
        output: ``numpy`` (float32 array) or ``torch`` (CPU tensor).
        show_progress: Show a tqdm bar.
        max_length: Truncate at this many tokens (default: the model's position limit).
    """
    if isinstance(texts, str):
        raise PromcseError("encode expects a list of texts, not a single string")
    was_training = encoder.training
    encoder.eval()
    order = length_order(encoder, texts)
    chunks: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), batch_size), disable=not show_progress, desc="encode", unit="batch"):
                batch = [texts[i] for i in order[start : start + batch_size]]
                vectors = encoder(encoder.tokenize(batch, max_length)).float()
                if normalize:
                    vectors = torch.nn.functional.normalize(vectors, dim=-1)
                chunks.append(vectors.cpu())
    finally:
        encoder.train(was_training)
    result = torch.empty(len(texts), encoder.dim)
    if chunks:
        result[torch.as_tensor(order)] = torch.cat(chunks)
    return result if output == "torch" else result.numpy()


def similarity(encoder: SentenceEncoder, a: list[str], b: list[str], batch_size: int = 64) -> np.ndarray:
    """Cosine similarity matrix (len(a), len(b))."""
    va = encode_texts(encoder, a, batch_size=batch_size, normalize=True)
    vb = encode_texts(encoder, b, batch_size=batch_size, normalize=True)
    return np.asarray(va) @ np.asarray(vb).T
