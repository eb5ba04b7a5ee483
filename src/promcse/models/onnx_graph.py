"""ONNX graphs of promcse encoders: tokenized input -> pooled embedding, with the prompts as constants.

One graph holds the K encoders that share one backbone module. It is the traced mixed-prompt forward of
:mod:`promcse.encoder.multiprompt`: the stacked prefix tables of :func:`~promcse.encoder.multiprompt.build_bank` are
constants of the graph, each row gathers its prompt's table by ``prompt_id`` (an int64 per row, an input only
when K > 1), its padded prefix slots are masked and its real tokens get its own prompt's position shift
(:func:`promcse.encoder.prompt.run_encoder_rows`, the very function ``bank_forward`` calls). Pooler and head, which
``bank_forward`` applies per group of rows in a Python loop, are computed here for every row with every
distinct pooler and every prompt's head, and each row keeps its own (a masked mean and one (H, H) matmul per
distinct head: negligible next to the encoder), so prompts with different poolers and head modes can share
one graph. The graph's outputs are ``embedding`` (pooled, after the head) and ``normalized_embedding`` (the
same, L2-normalised); batch and sequence axes are dynamic.

The graph is written with the TorchScript exporter (``torch.onnx.export(dynamo=False)``): the prefix key/value
cache is built inside the traced forward from the constant bank tensor, so the cache object never crosses the
trace boundary. ``quantize="int8"`` applies ONNX Runtime's dynamic quantisation (int8 weights, per output
channel, of every MatMul and of the backbone's embedding tables; activations quantised per batch at run
time); the prompt tables and heads stay fp32.

The export directory holds the graph (``model.onnx``, or ``model_int8.onnx``), the tokenizer files and
``promcse_onnx.json`` (:data:`META_FILE`): the prompts (name -> id, pooler, head, length, shift, max length),
the graph's inputs and outputs, which output is normalised (``normalization``), the embedding size, the
versions that wrote it, and its seal (:func:`promcse.models.onnx_meta.seal`): the size and sha256 of every file
written (``files``) and the digest of the metadata itself (``meta_sha256``), checked on every load.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from promcse.encoder.backbone import position_limit
from promcse.errors import PromcseError
from promcse.io.files import atomic_directory, atomic_write_text, check_output_dir
from promcse.encoder.model import SentenceEncoder
from promcse.encoder.multiprompt import build_bank
from promcse.encoder.pooling import POOLERS
from promcse.encoder.prompt import forward_inputs, run_encoder_rows
from promcse.models.onnx_meta import (FORMAT, FORMAT_VERSION, GRAPH_FILES, META_FILE, NORMALIZATION, OUTPUTS,
                                      TOKEN_INPUTS, seal)

QUANTIZE = tuple(GRAPH_FILES)
OPSET = 17


class BankGraph(nn.Module):
    """The traceable mixed-prompt forward of encoders sharing one backbone (see the module docstring).

    Args:
        encoders: In prompt-id order; they must share one backbone module.
        input_names: The token inputs the graph takes (``input_ids`` and ``attention_mask`` first).
    """

    def __init__(self, encoders: Sequence[SentenceEncoder], input_names: Sequence[str]) -> None:
        super().__init__()
        bank = build_bank(encoders)
        self.backbone = encoders[0].backbone
        self.input_names = tuple(input_names)
        self.multi = len(encoders) > 1
        self.has_prefix = bank.table is not None
        self.register_buffer("table", bank.table if bank.table is not None else torch.zeros(1))
        self.register_buffer("lengths", bank.lengths.clone())
        self.register_buffer("shifts", bank.shifts.clone())
        self.poolers = sorted({e.spec.pooler for e in encoders})
        self.register_buffer("pooler_of", torch.tensor([self.poolers.index(e.spec.pooler) for e in encoders]))
        self.all_layers = any(e.needs_all_layers for e in encoders)
        self._add_heads(encoders)

    def _add_heads(self, encoders: Sequence[SentenceEncoder]) -> None:
        """Stack the heads applied at inference ((K, H, H) weights, zero for prompts without one)."""
        uses = [e.head is not None and e.spec.head == "always" for e in encoders]
        self.any_head, self.all_heads = any(uses), all(uses)
        dim = encoders[0].dim
        weight, bias = torch.zeros(len(encoders), dim, dim), torch.zeros(len(encoders), dim)
        with torch.no_grad():
            for k, (encoder, used) in enumerate(zip(encoders, uses)):
                if used:
                    weight[k] = encoder.head.dense.weight.float()
                    bias[k] = encoder.head.dense.bias.float()
        self.register_buffer("head_weight", weight)
        self.register_buffer("head_bias", bias)
        self.register_buffer("head_used", torch.tensor(uses))

    def forward(self, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        """Token inputs (in :attr:`input_names` order), then ``prompt_id`` when there are several prompts."""
        inputs = dict(zip(self.input_names, tensors))
        mask = inputs["attention_mask"]
        ids = tensors[len(self.input_names)] if self.multi else torch.zeros_like(mask[:, 0])
        prefix = self.table[ids] if self.has_prefix else None
        states = run_encoder_rows(self.backbone, inputs, prefix, self.lengths[ids], self.shifts[ids], self.all_layers)
        pooled = self._pool(states, mask, ids)
        if self.any_head:
            pooled = self._head(pooled, ids)
        return pooled, nn.functional.normalize(pooled, dim=-1)

    def _pool(self, states: tuple[Tensor, ...], mask: Tensor, ids: Tensor) -> Tensor:
        """Each row pooled by its own prompt's pooler (every distinct pooler computed, the row's kept)."""
        pooled = torch.stack([POOLERS[name][0](states, mask) for name in self.poolers])  # (Q, B, H)
        if len(self.poolers) == 1:
            return pooled[0]
        return _select(pooled, self.pooler_of[ids])

    def _head(self, pooled: Tensor, ids: Tensor) -> Tensor:
        """``tanh(W_k x + b_k)`` with row b's own prompt k (rows of prompts without a head pass through)."""
        heads = torch.tanh(torch.einsum("bh,koh->kbo", pooled, self.head_weight) + self.head_bias.unsqueeze(1))
        out = heads[0] if not self.multi else _select(heads, ids)
        if self.all_heads:
            return out
        return torch.where(self.head_used[ids].unsqueeze(1), out, pooled)


def _select(stacked: Tensor, index: Tensor) -> Tensor:
    """Row b of ``stacked[index[b]]`` for (Q, B, H) ``stacked``: a one-hot sum, exact, and plain ONNX ops."""
    choices = torch.arange(stacked.shape[0], device=index.device).unsqueeze(1)
    onehot = (index.unsqueeze(0) == choices).to(stacked.dtype)  # (Q, B)
    return (onehot.unsqueeze(-1) * stacked).sum(0)


def graph_inputs(encoder: SentenceEncoder) -> list[str]:
    """Token inputs of the graph: what the tokenizer produces and the backbone's forward accepts."""
    produced = set(encoder.tokenizer.model_input_names) | {"input_ids", "attention_mask"}
    accepted = forward_inputs(encoder.backbone)
    return [name for name in TOKEN_INPUTS if name in produced and name in accepted]


def check_bank(encoders: Sequence[SentenceEncoder], names: Sequence[str]) -> None:
    """Refuse what one graph cannot hold: no encoder, names not unique, gated prompts, or encoders on different
    backbones.

    Raises:
        PromcseError: Naming the offending prompt.
    """
    if not encoders or len(encoders) != len(names):
        raise PromcseError("an ONNX export needs one name per encoder, and at least one encoder")
    if len(set(names)) != len(names):
        raise PromcseError(f"prompt names must be unique in one ONNX graph: {list(names)}", key="names")
    gated = [name for name, encoder in zip(names, encoders) if encoder.gated]
    if gated:
        raise PromcseError(f"'{gated[0]}' has a gated prompt (model.prompt_gate), whose separate gated prefix "
                           "attention the ONNX export does not carry yet: use it with the torch backend",
                           key="model.prompt_gate")
    for name, encoder in zip(names, encoders):
        if encoder.backbone is not encoders[0].backbone:
            raise PromcseError(f"'{name}' runs on a different backbone ({encoder.spec.backbone}) than "
                               f"'{names[0]}' ({encoders[0].spec.backbone}): one ONNX graph holds prompts over one "
                               "shared frozen backbone (full fine-tunes and released checkpoints carry their own)",
                               key="encoders")


def _example(encoders: Sequence[SentenceEncoder], input_names: Sequence[str]) -> tuple[Tensor, ...]:
    """Trace inputs: two rows of different lengths (padding present), each prompt id used."""
    batch = encoders[0].tokenizer(["a b c d e f g", "a"], padding=True, return_tensors="pt")
    tensors = [batch[name].long() if name in batch else torch.zeros_like(batch["input_ids"]) for name in input_names]
    if len(encoders) > 1:
        tensors.append(torch.tensor([0, len(encoders) - 1], dtype=torch.long))
    return tuple(tensors)


def write_graph(encoders: Sequence[SentenceEncoder], path: Path, opset: int = OPSET) -> list[str]:
    """Trace the bank of ``encoders`` (eval mode, CPU) into an fp32 ONNX file; returns the graph's input names."""
    input_names = graph_inputs(encoders[0])
    module = BankGraph(encoders, input_names).eval()
    names = input_names + (["prompt_id"] if len(encoders) > 1 else [])
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes.update({"prompt_id": {0: "batch"}} if len(encoders) > 1 else {})
    axes.update({name: {0: "batch"} for name in OUTPUTS})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes and constants that are constant here
        torch.onnx.export(module, _example(encoders, input_names), str(path), dynamo=False, input_names=names,
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)
    return names


class _NoPreprocessHint(logging.Filter):
    """Drops ONNX Runtime's hint to run its shape-inference pre-processing first: measured on all-MiniLM-L6-v2,
    it changes neither the quantised graph's accuracy nor its speed (and its symbolic shape inference fails on
    this graph)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights, per output channel, of every MatMul and of the
    backbone's embedding tables; the prompt tables and heads stay fp32.

    Per channel rather than per tensor: on all-MiniLM-L6-v2, STS-B dev Spearman 86.51 vs 86.36 (fp32 86.72)
    and a worst cosine to fp32 over 500 STS sentences of 0.974 vs 0.876, for ~20% more time. Quantising the
    embedding tables too shrinks MiniLM's graph from 56 to 22 MiB (fp32: 86) for a worst cosine of 0.977 vs
    0.979 over 300 sentences.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    keep = [node.name for node in model.graph.node if node.op_type == "Gather" and node.input[0] in initializers
            and not node.input[0].startswith("backbone.")]  # prompt tables, heads, per-prompt facts
    hint = _NoPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=keep)
    finally:
        logging.getLogger().removeFilter(hint)


def prompt_entry(name: str, k: int, encoder: SentenceEncoder, source: str) -> dict[str, Any]:
    """The metadata of prompt ``k`` of a graph."""
    spec = encoder.prompt.spec if encoder.prompt is not None else None
    shift = spec.length if spec is not None and spec.shift_positions else 0
    return {"name": name, "id": k, "source": source, "mode": encoder.spec.mode, "pooler": encoder.spec.pooler,
            "head": encoder.spec.head if encoder.head is not None else "none",
            "prompt_length": spec.length if spec is not None else 0,
            "shift_positions": bool(spec.shift_positions) if spec is not None else False,
            "max_length": position_limit(encoder.backbone.config) - shift}


def graph_meta(encoders: Sequence[SentenceEncoder], names: Sequence[str], sources: Sequence[str],
               inputs: Sequence[str], quantize: str) -> dict[str, Any]:
    """``promcse_onnx.json``."""
    import onnx
    import transformers

    from promcse.version import __version__

    first = encoders[0]
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "file": GRAPH_FILES[quantize],
            "precision": "int8" if quantize == "int8" else "fp32", "opset": OPSET, "inputs": list(inputs),
            "outputs": list(OUTPUTS), "multi_prompt": len(encoders) > 1, "dim": first.dim,
            "normalization": dict(NORMALIZATION),
            "backbone": {"name": first.spec.backbone, "model_type": first.spec.shape.model_type,
                         "unit_output": bool(getattr(first, "unit_output", False))},
            "prompt_ids": {name: k for k, name in enumerate(names)},
            "prompts": [prompt_entry(n, k, e, s) for k, (n, e, s) in enumerate(zip(names, encoders, sources))],
            "versions": {"promcse": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "transformers": transformers.__version__}}


def check_output(output: Path) -> None:
    """An export replaces only an empty directory or an earlier ONNX export, never anything else; a path under a
    file or in an unwritable place is refused too (:func:`promcse.io.files.check_output_dir`), before any work."""
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / META_FILE).is_file())):
        raise PromcseError("output exists and is not an ONNX export of promcse; choose a new directory", path=output)
    earlier = (output / META_FILE).is_file()
    check_output_dir(output, ours=lambda name: earlier, replaced=True, what="ONNX export directory")


def export_encoders(encoders: Sequence[SentenceEncoder], names: Sequence[str], output: str | Path,
                    quantize: str = "none", sources: Sequence[str] | None = None, cache_key: str | None = None) -> Path:
    """Write the ONNX export directory of ``encoders`` (one graph; prompt ``k`` = ``names[k]``).

    Args:
        encoders: Encoders sharing one backbone module (moved to CPU and eval mode).
        names: Their prompt names, in prompt-id order.
        output: The directory (created whole, atomically; an earlier export there is replaced).
        quantize: ``none`` (fp32) or ``int8`` (ONNX Runtime dynamic quantisation).
        sources: The model references, recorded in the metadata (default: the names).
        cache_key: The export cache's key, recorded for a cache entry (:func:`promcse.models.onnx_runtime.load_onnx`).

    Raises:
        PromcseError: An unknown ``quantize``, encoders that cannot share a graph, or an output that exists.
    """
    if quantize not in QUANTIZE:
        raise PromcseError(f"unknown quantisation '{quantize}'; choose one of {', '.join(QUANTIZE)}", key="quantize")
    _check_installed(quantize)
    check_bank(encoders, names)
    out = Path(output)
    check_output(out)
    for encoder in encoders:
        encoder.eval().to("cpu")

    def fill(tmp: Path) -> None:
        inputs = write_graph(encoders, tmp / GRAPH_FILES["none"])
        if quantize == "int8":
            quantize_file(tmp / GRAPH_FILES["none"], tmp / GRAPH_FILES["int8"])
        encoders[0].tokenizer.save_pretrained(str(tmp))
        meta = graph_meta(encoders, names, list(sources or names), inputs, quantize)
        if cache_key is not None:
            meta["cache_key"] = cache_key
        atomic_write_text(tmp / META_FILE, json.dumps(seal(meta, tmp), indent=2) + "\n")  # checksums, digest

    return atomic_directory(out, fill)


def _check_installed(quantize: str) -> None:
    """The exporter needs ``onnx``, quantisation ``onnxruntime`` too (the ``onnx`` extra)."""
    import importlib.util

    for package in ("onnx", "onnxruntime") if quantize == "int8" else ("onnx",):
        if importlib.util.find_spec(package) is None:
            raise PromcseError(f"ONNX export needs the '{package}' package: pip install 'promcse[onnx]'")


def quantize_file(fp32: Path, int8: Path) -> None:
    """Quantise ``fp32`` into ``int8`` and remove the fp32 graph (scratch files go to a temporary directory)."""
    scratch = Path(tempfile.mkdtemp(prefix="promcse-quant-"))
    try:
        quantize_int8(fp32, scratch / int8.name)
        shutil.move(str(scratch / int8.name), str(int8))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fp32.unlink()
