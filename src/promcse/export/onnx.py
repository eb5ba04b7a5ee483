"""``promcse export --format onnx``: model references -> one ONNX export directory (:mod:`promcse.models.onnx_graph`).

The models are loaded with one shared backbone cache (as the server's registry does), so that prompts over
the same frozen backbone end up in one graph with a ``prompt_id`` input. Each is given as a ``(name, model)``
pair, the name being its prompt's (the command line parses ``--model``/``--also``'s ``MODEL`` or
``NAME=MODEL`` into these pairs: :func:`promcse.cli.export.parse_models`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.encoder.backbone import load_backbone
from promcse.errors import PromcseError
from promcse.models.loading import backbone_key, load
from promcse.models.onnx_graph import check_output, export_encoders


def check_models(models: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``models`` as a list of ``(name, reference)`` string pairs.

    Raises:
        PromcseError: No model, an empty name or reference, or two prompts of the same name.
    """
    named: list[tuple[str, str]] = []
    for pair in models:
        if isinstance(pair, (str, bytes, Path)) or len(pair) != 2 or not all(pair):
            raise PromcseError(f"expected (name, model) pairs of non-empty strings, got {pair!r}", key="models")
        named.append((str(pair[0]), str(pair[1])))
    if not named:
        raise PromcseError("needs at least one (name, model) pair", key="models")
    names = [name for name, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PromcseError(f"two prompts named {', '.join(duplicates)}: give each its own name", key="models")
    return named


def export_onnx(models: Sequence[tuple[str, str]], output: str | Path, quantize: str = "none") -> Path:
    """Export ``models`` (prompts over one backbone) as one ONNX graph with its tokenizer and metadata.

    Args:
        models: ``(name, model reference)`` pairs; each name becomes its prompt's name, the first is prompt id 0.
        output: The directory to write (an earlier ONNX export there is replaced; anything else is refused).
        quantize: ``none`` (fp32) or ``int8``.

    Raises:
        PromcseError: A model that cannot be loaded, models on different backbones, or a bad output.
    """
    named = check_models(models)
    out = Path(output)
    for _, ref in named:
        if Path(ref).exists() and out.resolve() == Path(ref).resolve():
            raise PromcseError("the export directory must differ from the model directory", path=out)
    check_output(out)  # before the slow loads
    shared: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}

    def source(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        key = backbone_key(name)
        if key not in shared:
            shared[key] = load_backbone(name)
        return shared[key]

    encoders = [load(ref, device="cpu", backbones=source) for _, ref in named]
    return export_encoders(encoders, [n for n, _ in named], out, quantize=quantize, sources=[r for _, r in named])
