"""``promcse export --format onnx``: model references -> one ONNX export directory (:mod:`promcse.models.onnx_graph`).

The first model and every ``--also`` model are loaded with one shared backbone cache (as the server's
registry does), so that prompts over the same frozen backbone end up in one graph with a ``prompt_id`` input.
A model is given as ``MODEL`` (its prompt is named after the directory) or ``NAME=MODEL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.encoder.backbone import load_backbone
from promcse.errors import PromcseError
from promcse.models.loading import backbone_key, load
from promcse.models.onnx_graph import check_output, export_encoders


def parse_models(models: Sequence[str]) -> list[tuple[str, str]]:
    """``MODEL`` or ``NAME=MODEL`` -> (name, reference); a bare model is named after its last path part.

    Raises:
        PromcseError: An empty name or model, or two prompts of the same name.
    """
    named: list[tuple[str, str]] = []
    for value in models:
        name, sep, ref = value.partition("=")
        if not sep or Path(value).exists():
            name, ref = Path(value.rstrip("/")).name or value, value
        if not name or not ref:
            raise PromcseError(f"expected MODEL or NAME=MODEL, got '{value}'", key="--also")
        named.append((name, ref))
    names = [name for name, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PromcseError(f"two prompts named {', '.join(duplicates)}: name them with NAME=MODEL", key="--also")
    return named


def export_onnx(models: Sequence[str], output: str | Path, quantize: str = "none") -> Path:
    """Export ``models`` (prompts over one backbone) as one ONNX graph with its tokenizer and metadata.

    Args:
        models: ``MODEL`` or ``NAME=MODEL`` values; the first is prompt id 0.
        output: The directory to write (an earlier ONNX export there is replaced; anything else is refused).
        quantize: ``none`` (fp32) or ``int8``.

    Raises:
        PromcseError: A model that cannot be loaded, models on different backbones, or a bad output.
    """
    named = parse_models(models)
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
