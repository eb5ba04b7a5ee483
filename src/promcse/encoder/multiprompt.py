"""Mixed-prompt encoding: rows that ask for different prompts share ONE forward pass over one frozen backbone.

A deep prompt is per-row key/value data, so a batch can carry a different prompt in every row: the
encoders over one backbone module have their prefix tables stacked once into a :class:`PromptBank`
``(K, P_max, L*2*H)`` (shorter prompts zero-padded); each row gathers its table by prompt id, its padded
slots (all P_max of them for a bare-backbone row) are masked out of attention, and its real tokens get its
own prompt's position shift (:func:`promcse.encoder.prompt.run_encoder_rows`). Pooler and head are then applied per
group of rows of the same model. Rows whose backbone differs (full fine-tunes, released checkpoints with
their own weights) form their own groups, and so do gated prompts (``model.prompt_gate``): their attention
takes the prefix through a separate, gated softmax, so a bank holds gated or ungated prompts, never both
(each row of a gated bank gets its own prompt's gates, 0 for a bare-backbone row). Every row's embedding
equals what its model's own ``encode`` gives (tests/test_multiprompt.py, tests/test_gated_prompt.py, max
|delta| <= 1e-5).

Adapter libraries (PEFT's LoRA, Ray Serve's multiplexing) split such a batch into one sub-batch per
adapter; nothing in transformers or PEFT batches prefixes of different prompts, hence this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from promcse.encoder.encode import pad_batch, token_length_order, tokenize_all
from promcse.errors import PromcseError
from promcse.encoder.model import SentenceEncoder
from promcse.encoder.prompt import run_encoder_rows


@dataclass(frozen=True)
class PromptBank:
    """Materialised prompts of the encoders that share one backbone module.

    Attributes:
        encoders: The encoders, in prompt-id order (id k = ``encoders[k]``).
        table: (K, P_max, L*2*H) prefix tables, zero beyond each prompt's own length; None when no
            encoder has a prompt.
        lengths: (K,) prompt lengths (0 for an encoder without a prompt).
        shifts: (K,) position shift of each encoder's real tokens (its length if ``shift_positions``, else 0).
        gates: (K, L, heads) gate values (``tanh`` of the gates; 0 for an encoder without a prompt) when the
            prompts are gated, else None.
    """

    encoders: tuple[SentenceEncoder, ...]
    table: Tensor | None
    lengths: Tensor
    shifts: Tensor
    gates: Tensor | None = None


def build_bank(encoders: Sequence[SentenceEncoder]) -> PromptBank:
    """Stack the inference-time prefix tables (no dropout) of encoders that share one backbone."""
    if len({id(e.backbone) for e in encoders}) != 1:
        raise ValueError("a prompt bank holds encoders of one shared backbone module")
    specs = [e.prompt.spec if e.prompt is not None else None for e in encoders]
    lengths = torch.tensor([s.length if s is not None else 0 for s in specs], dtype=torch.long)
    shifts = torch.tensor([s.length if s is not None and s.shift_positions else 0 for s in specs], dtype=torch.long)
    longest = int(lengths.max()) if len(encoders) else 0
    table = None
    if longest:
        first = encoders[0]
        width = first.spec.shape.num_layers * 2 * first.spec.shape.hidden_size
        table = torch.zeros(len(encoders), longest, width, device=first.device)
        with torch.no_grad():
            for k, encoder in enumerate(encoders):
                if encoder.prompt is not None:
                    table[k, : encoder.prompt.spec.length] = encoder.prompt.table().float()
    return PromptBank(tuple(encoders), table, lengths, shifts, _stack_gates(encoders))


def _stack_gates(encoders: Sequence[SentenceEncoder]) -> Tensor | None:
    """(K, L, heads) gate values of a bank of gated prompts, None for ungated ones.

    Raises:
        PromcseError: Gated and ungated prompts in one bank (their attention differs).
    """
    gated = [e.gated for e in encoders]
    if not any(gated):
        return None
    if any(e.prompt is not None and not e.gated for e in encoders):
        raise PromcseError("gated prompts (model.prompt_gate) and ungated ones cannot share one mixed-prompt "
                           "forward pass: group them separately", key="model.prompt_gate")
    shape = encoders[0].spec.shape
    gates = torch.zeros(len(encoders), shape.num_layers, shape.num_heads, device=encoders[0].device)
    with torch.no_grad():
        for k, encoder in enumerate(encoders):
            if encoder.gated:
                gates[k] = encoder.prompt.gate_values().float()
    return gates


def bank_forward(bank: PromptBank, inputs: dict[str, Tensor], ids: Tensor) -> Tensor:
    """Embed a tokenized batch whose row b uses encoder ``ids[b]`` of the bank: (B, D), not normalised."""
    members = [bank.encoders[k] for k in ids.tolist()]
    all_layers = any(e.needs_all_layers for e in members)
    prefix = None if bank.table is None else bank.table[ids.to(bank.table.device)]
    backbone = bank.encoders[0].backbone
    gate = None if bank.gates is None else bank.gates[ids.to(bank.gates.device)]
    states = run_encoder_rows(backbone, inputs, prefix, bank.lengths[ids], bank.shifts[ids], all_layers, gate)
    mask = inputs["attention_mask"]
    out = torch.empty(len(ids), bank.encoders[0].dim, device=mask.device, dtype=states[-1].dtype)
    for k in torch.unique(ids).tolist():
        rows = (ids == k).nonzero().squeeze(1).to(mask.device)
        encoder = bank.encoders[k]
        pooled = encoder.pool_fn(tuple(h[rows] for h in states), mask[rows])
        out[rows] = encoder.head(pooled) if encoder.use_head() else pooled
    return out


def _tokens_per_row(bank: PromptBank, texts: Sequence[str], ids: np.ndarray) -> dict[str, list[list[int]]]:
    """Tokenize every text under its own model's position limit (prompt shifts shorten it)."""
    merged: dict[str, list[list[int]]] = {}
    for k in np.unique(ids).tolist():
        rows = np.flatnonzero(ids == k)
        tokens = tokenize_all(bank.encoders[k], [texts[i] for i in rows], None)
        for key, values in tokens.items():
            column = merged.setdefault(key, [[] for _ in texts])
            for i, value in zip(rows.tolist(), values):
                column[i] = value
    return merged


def encode_bank(bank: PromptBank, texts: Sequence[str], ids: Sequence[int], batch_size: int = 64) -> Tensor:
    """Encode ``texts[i]`` with encoder ``ids[i]`` of the bank: (N, D) CPU float32, input order, not normalised.

    Rows are sorted by token count across all prompts and forwarded ``batch_size`` at a time, each batch
    mixing prompts freely.
    """
    ids_np = np.asarray(ids, dtype=np.int64)
    result = torch.empty(len(texts), bank.encoders[0].dim)
    if not len(texts):
        return result
    first = bank.encoders[0]
    tokens = _tokens_per_row(bank, texts, ids_np)
    order = token_length_order(tokens)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            vectors = bank_forward(bank, pad_batch(first, tokens, rows), torch.as_tensor(ids_np[rows]))
            result[torch.as_tensor(rows)] = vectors.float().cpu()
    return result


def encode_mixed(encoders: Sequence[SentenceEncoder], texts: Sequence[str], batch_size: int = 64,
                 normalize: bool = True) -> np.ndarray:
    """Encode ``texts[i]`` with ``encoders[i]``: one forward pass per batch for every group sharing a backbone.

    Args:
        encoders: One encoder per text (in eval mode); encoders over the same backbone module are batched
            together whatever their prompts (gated prompts apart from ungated ones), the others in groups of their
            own backbone.
        texts: The texts.
        batch_size: Rows per forward pass.
        normalize: L2-normalise the vectors (rows of a model whose pipeline ends in Normalize, see
            :attr:`SentenceEncoder.unit_output`, are unit length either way).

    Returns:
        (N, D) float32 array in input order.

    Raises:
        PromcseError: Encoders of different output dimensions.
    """
    if len(encoders) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(encoders)} encoders")
    dims = sorted({e.dim for e in encoders})
    if len(dims) > 1:  # one (N, D) array cannot hold them; the registry's encode_rows returns one vector per row
        raise PromcseError(f"encoders of different dimensions {dims} cannot share one (N, D) array: encode each "
                           "dimension's rows apart, or use PromptRegistry.encode_rows (one vector per row)")
    result = np.empty((len(texts), dims[0] if dims else 0), dtype=np.float32)
    for members, rows in _backbone_groups(encoders):
        bank = build_bank(members)
        local = {id(e): k for k, e in enumerate(members)}
        vectors = encode_bank(bank, [texts[i] for i in rows], [local[id(encoders[i])] for i in rows], batch_size)
        unit = torch.tensor([normalize or encoders[i].unit_output for i in rows], dtype=torch.bool)
        if unit.any():  # asked for, or the row's model ends in Normalize (as its own encode does)
            vectors[unit] = torch.nn.functional.normalize(vectors[unit], dim=-1)
        result[rows] = vectors.numpy()
    return result


def _backbone_groups(encoders: Sequence[SentenceEncoder]) -> list[tuple[list[SentenceEncoder], np.ndarray]]:
    """Distinct encoders grouped by backbone module and gating, with the rows that use each group."""
    groups: dict[tuple[int, bool], tuple[list[SentenceEncoder], list[int]]] = {}
    for row, encoder in enumerate(encoders):
        members, rows = groups.setdefault((id(encoder.backbone), encoder.gated), ([], []))
        if all(m is not encoder for m in members):
            members.append(encoder)
        rows.append(row)
    return [(members, np.asarray(rows, dtype=np.int64)) for members, rows in groups.values()]
