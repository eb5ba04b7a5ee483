"""What ``encode`` returns, shaped like sentence-transformers' ``encode``: one place for both backends.

The torch encoder (:class:`promcse.encoder.model.SentenceEncoder`) and the ONNX encoder
(:class:`promcse.models.onnx_runtime.OnnxEncoder`) compute raw pooled vectors in input order; :func:`finish`
turns them into what the caller asked for, with sentence-transformers' argument names, defaults and order of
operations:

1. ``unit_output``: the model's own pipeline ends in L2 normalisation (a sentence-transformers folder whose
   ``modules.json`` lists ``Normalize``, e.g. all-MiniLM-L6-v2): vectors are unit length whatever the caller
   says, exactly as ``SentenceTransformer(...).encode`` returns them;
2. ``truncate_dim``: keep the first ``truncate_dim`` dimensions (Matryoshka-style);
3. ``normalize_embeddings``: L2-normalise (default **False**, as in sentence-transformers);
4. ``precision``: ``float32``, or quantised with :func:`quantize` (``int8``/``uint8``: per-dimension buckets
   between the batch's minimum and maximum; ``binary``/``ubinary``: the sign bits packed 8 per byte);
5. ``convert_to_tensor`` (one tensor) / ``convert_to_numpy`` (one array, the default) / neither (a list of
   tensors); a single string in gives one vector out.

Why by hand: sentence-transformers is an optional extra here, and its quantiser lives inside that package; the
arithmetic is a few lines, pinned against sentence-transformers itself by ``tests/test_encode_api.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from promcse.errors import PromcseError

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")
# What ``encode`` returns: an (N, D) array (the default) or tensor, a list of N tensors, or one (D,) vector.
Embeddings = np.ndarray | torch.Tensor | list[torch.Tensor]


@dataclass(frozen=True)
class EncodeOptions:
    """How ``encode`` shapes its vectors (sentence-transformers' names and defaults).

    Attributes:
        normalize_embeddings: L2-normalise the (truncated) vectors.
        truncate_dim: Keep only the first this-many dimensions (None: all).
        precision: ``float32``, ``int8``, ``uint8``, ``binary`` or ``ubinary``.
        convert_to_numpy: Return one numpy array (else a list of tensors, unless ``convert_to_tensor``).
        convert_to_tensor: Return one torch tensor (wins over ``convert_to_numpy``).
    """

    normalize_embeddings: bool = False
    truncate_dim: int | None = None
    precision: str = "float32"
    convert_to_numpy: bool = True
    convert_to_tensor: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PromcseError(f"unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}",
                               key="precision")
        if self.truncate_dim is not None and (isinstance(self.truncate_dim, bool) or not isinstance(
                self.truncate_dim, int) or self.truncate_dim < 1):
            raise PromcseError(f"expected a positive whole number of dimensions, got {self.truncate_dim!r}",
                               key="truncate_dim")


def encode_options(aliases: dict[str, Any], normalize_embeddings: bool, truncate_dim: int | None, precision: str,
                   convert_to_numpy: bool, convert_to_tensor: bool,
                   show_progress_bar: bool | None) -> tuple[EncodeOptions, bool]:
    """The call's :class:`EncodeOptions` and whether to show a bar, with promcse's older names applied.

    ``normalize`` stands for ``normalize_embeddings``, ``show_progress`` for ``show_progress_bar`` and
    ``output="torch"|"numpy"`` for ``convert_to_tensor``; any other extra keyword is refused by name (as
    sentence-transformers refuses keywords its model does not use).
    """
    unknown = sorted(set(aliases) - {"normalize", "show_progress", "output"})
    if unknown:
        raise PromcseError(f"encode got unexpected keyword argument(s) {', '.join(unknown)}", key=unknown[0])
    if aliases.get("normalize") is not None:
        normalize_embeddings = bool(aliases["normalize"])
    if aliases.get("show_progress") is not None:
        show_progress_bar = bool(aliases["show_progress"])
    output = aliases.get("output")
    if output is not None:
        if output not in ("numpy", "torch"):
            raise PromcseError(f"expected 'numpy' or 'torch', got {output!r}", key="output")
        convert_to_tensor = output == "torch"
    options = EncodeOptions(normalize_embeddings=normalize_embeddings, truncate_dim=truncate_dim, precision=precision,
                            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor)
    return options, bool(show_progress_bar)


def check_batch_size(batch_size: int) -> None:
    """A positive whole ``batch_size``, else a clear error (not an empty loop or a range() error)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PromcseError(f"expected a positive whole number, got {batch_size!r}", key="batch_size")


def check_texts(texts: Any) -> tuple[list[str], bool]:
    """``(texts as a list, whether one string came in)``; anything but strings is refused, naming the row."""
    single = isinstance(texts, str)
    rows = [texts] if single else list(texts)
    for number, text in enumerate(rows):
        if not isinstance(text, str):
            raise PromcseError(f"text {number} is a {type(text).__name__}, not a string", key="sentences")
    return rows, single


def quantize(vectors: np.ndarray, precision: str) -> np.ndarray:
    """Quantise float vectors (N, D) as sentence-transformers' ``quantize_embeddings`` does without ranges.

    ``uint8``: with ``lo``/``hi`` each dimension's minimum and maximum over the N rows and
    ``step = (hi - lo) / 255`` (1 where hi = lo), ``q = clip(floor((x - lo) / step), 0, 255)``;
    ``int8`` is ``q - 128``. ``ubinary``: ``packbits(x > 0)`` along the last axis (D/8 bytes, big-endian bit
    order, the last byte zero-padded); ``binary`` is that minus 128 as int8.

    Raises:
        PromcseError: ``int8``/``uint8`` of fewer than two vectors (no range to calibrate on).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if precision == "float32":
        return vectors
    if precision in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if len(vectors) < 2:
        raise PromcseError(f"{precision} buckets are calibrated on the batch's own range: encode at least two "
                           "texts at once (one vector has no range)", key="precision")
    lo, hi = vectors.min(axis=0), vectors.max(axis=0)
    step = (hi - lo) / 255
    step = np.where(step == 0, 1, step)
    buckets = np.clip(np.floor((vectors - lo) / step), 0, 255)
    return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)


def finish(vectors: torch.Tensor | np.ndarray, unit_output: bool, options: EncodeOptions,
           single: bool) -> Embeddings:
    """Raw (N, D) float vectors in input order -> what ``encode`` returns (see the module docstring)."""
    x = torch.as_tensor(np.asarray(vectors) if isinstance(vectors, np.ndarray) else vectors).float()
    if unit_output:
        x = torch.nn.functional.normalize(x, p=2, dim=-1)
    if options.truncate_dim is not None:
        x = x[..., : options.truncate_dim]
    if options.normalize_embeddings:
        x = torch.nn.functional.normalize(x, p=2, dim=-1)
    out: Any = x
    if options.precision != "float32" and len(x):
        out = torch.from_numpy(quantize(x.numpy(), options.precision))
    if options.convert_to_tensor:
        result: Any = out
    elif options.convert_to_numpy:
        result = out.numpy()
    else:
        result = list(out)
    return result[0] if single else result
