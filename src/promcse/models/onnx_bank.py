"""An ONNX graph of a frozen backbone whose prompt bank is an *input*: one graph serves every prompt of a backbone.

:mod:`promcse.models.onnx_graph` bakes the prompts into the graph as constants, so a new prompt means a new export.
Here the graph takes, besides the token inputs, ``prompt_id`` (B,) int64, ``bank`` (K, P, L*2*H) float32 (the K
distinct prefix tables of this batch, each padded to the longest P), ``lengths`` (K,) and ``shifts`` (K,) int64
(real prefix slots, position shift): exactly what :func:`promcse.encoder.multiprompt.build_bank` stacks and
:func:`promcse.encoder.prompt.run_encoder_rows` consumes, traced once with K and P as dynamic axes (checked in
``tests/test_onnx_bank.py``: a graph traced with one 3-slot prompt runs banks of other sizes). A prompt added to a
running server is one more row of the next batch's bank: no re-export. Rows of the bare backbone take a zero table
with ``lengths`` 0 (every prefix slot masked).

One graph per (backbone, pooler); prompts that apply an MLP head at inference, or a gated prefix, are refused
(:func:`bank_arrays`): use the torch backend or the per-prompt export of :mod:`promcse.models.onnx_graph` for them.
The export directory holds the graph (``model.onnx`` or ``model_int8.onnx``, dynamic int8 quantisation of the
backbone's MatMuls and embedding tables as in :func:`promcse.models.onnx_graph.quantize_int8`), the tokenizer and
``promcse_onnx_bank.json`` (the backbone, pooler, dim, inputs and the sha256 of every file, checked on load).
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promcse.errors import PromcseError

BANK_META = "promcse_onnx_bank.json"
BANK_FORMAT = "promcse-onnx-bank"
BANK_INPUTS = ("prompt_id", "bank", "lengths", "shifts")
OUTPUT = "embedding"
BANK_KEYS: dict[str, type] = {"file": str, "inputs": list, "dim": int, "width": int, "position_limit": int,
                              "files": dict}  # what OnnxBankEncoder reads from the metadata


@dataclass(frozen=True)
class BankRow:
    """One prompt's share of a bank: its (P, L*2*H) float32 table (P = 0: the bare backbone) and position shift."""

    table: np.ndarray
    shift: int


def bank_arrays(encoder: Any) -> BankRow:
    """The :class:`BankRow` of a torch :class:`promcse.encoder.model.SentenceEncoder` (prompt, or frozen backbone).

    Raises:
        PromcseError: A gated prompt, an MLP head applied at inference, or a full fine-tune (its own backbone).
    """
    import torch

    if encoder.spec.mode == "full":
        raise PromcseError("a full fine-tune carries its own backbone: it cannot share a prompt-bank graph",
                           key="encoder.mode")
    if encoder.gated:
        raise PromcseError("a gated prompt's separate prefix attention is not in the prompt-bank graph",
                           key="model.prompt_gate")
    if encoder.head is not None and encoder.spec.head == "always":
        raise PromcseError("a prompt with an MLP head at inference (head 'always') is not in the prompt-bank graph",
                           key="encoder.head")
    width = encoder.spec.shape.num_layers * 2 * encoder.spec.shape.hidden_size
    if encoder.prompt is None:
        return BankRow(np.zeros((0, width), dtype=np.float32), 0)
    with torch.no_grad():
        table = encoder.prompt.table().float().cpu().numpy()
    spec = encoder.prompt.spec
    return BankRow(np.ascontiguousarray(table), spec.length if spec.shift_positions else 0)


def stack_bank(rows: Sequence[BankRow], width: int,
               scratch: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bank (K, P, W), lengths (K,), shifts (K,))`` of K distinct prompts, each table padded to the longest (at
    least one slot, masked for rows without a prompt, so the graph always has a prefix).

    With ``scratch`` (a flat float32 buffer of at least K*P*W finite values) the bank is a view of it and the padded
    slots keep whatever finite values a previous batch left there: the graph masks every slot past a prompt's
    length, so they never reach a vector, and the 100s of MB of zero-filling and fresh pages that a batch of
    1,000 distinct prompts would otherwise cost each time are saved (benchmarks/bench_fleet.py).
    """
    longest = max([1] + [row.table.shape[0] for row in rows])
    shape = (len(rows), longest, width)
    if scratch is not None and scratch.size >= len(rows) * longest * width:
        bank = scratch[: len(rows) * longest * width].reshape(shape)
    else:
        bank = np.zeros(shape, dtype=np.float32)
    for k, row in enumerate(rows):
        bank[k, : row.table.shape[0]] = row.table
    lengths = np.asarray([row.table.shape[0] for row in rows], dtype=np.int64)
    return bank, lengths, np.asarray([row.shift for row in rows], dtype=np.int64)


def _graph_module(encoder: Any, input_names: Sequence[str]) -> Any:
    """The traceable module: token inputs + bank inputs -> pooled vectors (the encoder's pooler)."""
    from torch import Tensor, nn

    from promcse.encoder.pooling import POOLERS
    from promcse.encoder.prompt import run_encoder_rows

    pool, all_layers = POOLERS[encoder.spec.pooler]

    class OpenBankGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = encoder.backbone

        def forward(self, *tensors: Tensor) -> Tensor:
            inputs = dict(zip(input_names, tensors))
            prompt_id, bank, lengths, shifts = tensors[len(input_names):]
            states = run_encoder_rows(self.backbone, inputs, bank[prompt_id], lengths[prompt_id], shifts[prompt_id],
                                      all_layers)
            return pool(states, inputs["attention_mask"])

    return OpenBankGraph().eval()


def write_bank_graph(encoder: Any, path: Path) -> list[str]:
    """Trace the open-bank graph of ``encoder``'s backbone and pooler (CPU, eval) to ``path``; its input names."""
    import torch

    from promcse.models.onnx_graph import OPSET, graph_inputs

    token_names = graph_inputs(encoder)
    batch = encoder.tokenizer(["a b c d e f g", "a"], padding=True, return_tensors="pt")
    tokens = [batch[n].long() if n in batch else torch.zeros_like(batch["input_ids"]) for n in token_names]
    width = encoder.spec.shape.num_layers * 2 * encoder.spec.shape.hidden_size
    example = (*tokens, torch.tensor([0, 0]), torch.zeros(1, 3, width), torch.tensor([3]), torch.tensor([0]))
    names = [*token_names, *BANK_INPUTS]
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in token_names}
    axes.update({"prompt_id": {0: "batch"}, "bank": {0: "prompts", 1: "prefix"}, "lengths": {0: "prompts"},
                 "shifts": {0: "prompts"}, OUTPUT: {0: "batch"}})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes that are dynamic axes here
        torch.onnx.export(_graph_module(encoder, token_names), example, str(path), dynamo=False, input_names=names,
                          output_names=[OUTPUT], dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)
    return names


def export_bank_graph(encoder: Any, output: str | Path, quantize: str = "none") -> Path:
    """Write the open-bank export of ``encoder``'s backbone and pooler to ``output`` (atomically).

    Args:
        encoder: Any encoder over the backbone (its prompt, if any, is not part of the graph).
        output: A new directory (or an earlier bank export, replaced).
        quantize: ``none`` (fp32) or ``int8``.
    """
    from promcse.encoder.backbone import position_limit
    from promcse.io.files import atomic_directory, atomic_write_text, file_manifest
    from promcse.models.onnx_graph import GRAPH_FILES, quantize_file

    if quantize not in GRAPH_FILES:
        raise PromcseError(f"unknown quantisation '{quantize}'; choose one of {', '.join(GRAPH_FILES)}",
                           key="quantize")
    encoder.eval().to("cpu")

    def fill(tmp: Path) -> None:
        names = write_bank_graph(encoder, tmp / GRAPH_FILES["none"])
        if quantize == "int8":
            quantize_file(tmp / GRAPH_FILES["none"], tmp / GRAPH_FILES["int8"])
        encoder.tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        meta = {"format": BANK_FORMAT, "format_version": 1, "file": GRAPH_FILES[quantize], "inputs": names,
                "backbone": encoder.spec.backbone, "model_type": encoder.spec.shape.model_type,
                "pooler": encoder.spec.pooler, "dim": encoder.dim, "position_limit": position_limit(
                    encoder.backbone.config), "width": int(
                    encoder.spec.shape.num_layers * 2 * encoder.spec.shape.hidden_size),
                "unit_output": bool(encoder.unit_output), "files": file_manifest(tmp, files)}
        atomic_write_text(tmp / BANK_META, json.dumps(meta, indent=2) + "\n")

    return atomic_directory(Path(output), fill)


class OnnxBankEncoder:
    """ONNX Runtime over an open-bank export: rows of any prompts of its backbone in one run.

    Args:
        directory: The export directory (:func:`export_bank_graph`).
        threads: ONNX Runtime intra-op threads (0: its default).
        spinning: Let those threads busy-wait for work (see :func:`promcse.models.onnx_runtime.make_session`;
            the server turns it off).

    Raises:
        PromcseError: Not a bank export, or a file that changed since the export (naming it).
    """

    def __init__(self, directory: str | Path, threads: int = 0, spinning: bool = True) -> None:
        from promcse.io.files import verify_manifest
        from promcse.io.json_fields import checked
        from promcse.io.schema import read_json_object
        from promcse.models.onnx_runtime import load_tokenizer, make_session

        self.directory = Path(directory)
        self.meta = read_json_object(self.directory / BANK_META)
        if self.meta.get("format") != BANK_FORMAT:
            raise PromcseError(f"not a {BANK_FORMAT} export", path=self.directory / BANK_META, key="format")
        for key, kind in BANK_KEYS.items():
            checked(self.meta, key, kind, self.directory / BANK_META)
        verify_manifest(self.directory, self.meta.get("files"), [self.meta["file"]], self.directory / BANK_META)
        self.session = make_session(self.directory / self.meta["file"], threads, spinning=spinning)
        self.tokenizer = load_tokenizer(self.directory)
        self.token_names = [n for n in self.meta["inputs"] if n not in BANK_INPUTS]
        self._scratch = np.zeros(0, dtype=np.float32)
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.meta["dim"])

    def run(self, texts: Sequence[str], rows: Sequence[BankRow], prompt_of: Sequence[int],
            max_length: int | None = None) -> np.ndarray:
        """Raw (N, D) float32 vectors: ``texts[i]`` under prompt ``rows[prompt_of[i]]``, one graph run.

        Args:
            texts: The texts (one batch: sort and split long inputs before calling).
            rows: The distinct prompts of this batch.
            prompt_of: Per text, its prompt's index in ``rows``.
            max_length: Truncate at this many tokens (default and at most: the backbone's position limit less the
                row's own prompt shift, as the torch encoders do).
        """
        batch = self._tokens(texts, [rows[k].shift for k in prompt_of], max_length)
        feed = {n: np.asarray(batch[n] if n in batch else np.zeros_like(batch["input_ids"]), dtype=np.int64)
                for n in self.token_names}
        width = int(self.meta["width"])
        with self._lock:  # one scratch buffer: runs of this encoder take turns (the server's are serialised anyway)
            need = len(rows) * max([1] + [r.table.shape[0] for r in rows]) * width
            if self._scratch.size < need:
                self._scratch = np.zeros(need, dtype=np.float32)
            bank, lengths, shifts = stack_bank(rows, width, self._scratch)
            feed.update({"prompt_id": np.asarray(prompt_of, dtype=np.int64), "bank": bank, "lengths": lengths,
                         "shifts": shifts})
            return self.session.run([OUTPUT], feed)[0]

    def _tokens(self, texts: Sequence[str], shifts: Sequence[int], max_length: int | None) -> dict[str, Any]:
        """Tokenize each text at its own limit (position limit less its prompt's shift), then pad together."""
        position_limit = int(self.meta["position_limit"])
        features: list[dict[str, Any]] = [{} for _ in texts]
        for shift in sorted(set(shifts)):
            limit = min(max_length or position_limit, position_limit - shift)
            index = [i for i, s in enumerate(shifts) if s == shift]
            encoded = self.tokenizer([texts[i] for i in index], truncation=True, max_length=limit, padding=False)
            for j, i in enumerate(index):
                features[i] = {key: values[j] for key, values in encoded.items()}
        return self.tokenizer.pad(features, padding=True, return_tensors="np")
