"""GradCache: a contrastive step over a big batch in the activation memory of one small chunk.

Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(RepL4NLP 2021). A contrastive loss couples every row of the batch, so the batch cannot simply be
split into micro-batches with gradient accumulation. But the loss depends on the encoder only
through the embeddings ``Z = f_theta(X)``, so by the chain rule::

    dL/dtheta = sum_chunks (dL/dZ_c)^T (dZ_c/dtheta)

1. forward every chunk without a graph and keep only ``Z`` ((N, D), a few MB);
2. compute the loss on the full ``Z`` and back-propagate to ``Z`` only: ``G = dL/dZ``;
3. re-run each chunk with a graph and back-propagate ``G_c`` into the parameters.

Peak activation memory is that of one chunk (plus the loss on (N, D) embeddings) at the cost of
a second forward pass. Step 3 must see exactly the activations of step 1, so each chunk's random
state (CPU generator and the device's CUDA generator) is recorded before its first forward and
replayed for its second: backbone dropout and prefix dropout draw the same masks.

Chunks are cut from rows sorted by length (:func:`length_chunks`), each padded only to its own
longest row, so a chunk of short sentences costs little.

What "equal to the plain step" means: dropout masks depend on tensor shapes, so rows forwarded in
one grouping draw different masks than the same rows forwarded in (c, T') chunks. GradCache is
therefore exactly equal (up to float rounding) to :func:`chunked_reference_step`, plain
back-propagation through the *same* chunked forwards from the same random state; with dropout off
it equals the single-forward full-batch step, because with an attention mask padding changes
nothing. Both are tested. Either way the loss is the full-batch loss: every row is contrasted with
all N rows, not only those of its chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

LossFn = Callable[[list[Tensor]], dict[str, Tensor]]
Inputs = dict[str, Tensor]
# One more forward call costs about as much as this many padded tokens (Python overhead on CPU,
# kernel launches on GPU); the plain step's length grouping only splits where it saves more padding
# than that. Keyed by device type; other devices use the CUDA value.
GROUP_OVERHEAD_TOKENS: dict[str, int] = {"cpu": 64, "cuda": 1024}


@dataclass
class RngState:
    """Random state of the CPU generator and (for a CUDA device) that device's generator.

    Attributes:
        cpu: ``torch.get_rng_state()``.
        cuda: ``torch.cuda.get_rng_state(device)``, or None on CPU.
        device: The device whose generator ``cuda`` belongs to.
    """

    cpu: Tensor
    cuda: Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        """Record the state that the next forward pass on ``device`` will draw from."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the surrounding random state is restored afterwards.

        Restoring matters: after the second pass the generators continue where the first pass left
        them, so a run with GradCache stays deterministic and independent of the chunk replays.
        """
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class Chunk:
    """Some rows of the batch, forwarded together.

    Attributes:
        rows: Positions of these rows in the full (all views concatenated) row list.
        inputs: Their tokenized inputs, cut to the longest of them (no all-padding columns).
    """

    rows: Tensor
    inputs: Inputs


def _best_split(lengths: list[int], overhead: int) -> list[int]:
    """Group sizes over rows sorted longest first, minimising ``sum(size * longest) + overhead * groups``.

    Cuts only where the length drops (a cut elsewhere never helps), so the dynamic programme is
    O(K^2) in the number K of distinct lengths (<= max_length).
    """
    n = len(lengths)
    cuts = [0] + [i for i in range(1, n) if lengths[i] < lengths[i - 1]] + [n]
    best: dict[int, tuple[int, list[int]]] = {n: (0, [])}
    for a in reversed(cuts[:-1]):
        best[a] = min(((b - a) * lengths[a] + overhead + best[b][0], [b - a] + best[b][1])
                      for b in cuts if b > a)
    return best[0][1]


def length_chunks(inputs: Inputs, max_rows: int = 0, overhead_tokens: int | None = None) -> list[Chunk]:
    """Rows sorted by length and cut into chunks, each padded only to its own longest row.

    Tokenizing the whole batch once and slicing is cheaper than tokenizing per chunk. Padding is
    masked (changes nothing but cost), and dropout is drawn per row, so grouping rows by length
    changes nothing but the compute spent on padding: on SNLI triplets at max_len 32 and batch 64
    the padded token count drops from 3 x 64 x 32 = 6144 to ~2700 per step (wiki: 4096 to ~3050).

    Args:
        inputs: Tokenizer output (``input_ids``, ``attention_mask``, ...), all ``(N, T)``.
        max_rows: At most this many rows per chunk (GradCache's memory bound); 0: no bound, and the
            chunking minimises padded tokens + ``overhead_tokens`` per forward call.
        overhead_tokens: Fixed cost of one more forward call, in token-equivalents (default:
            :data:`GROUP_OVERHEAD_TOKENS` for the inputs' device).

    Returns:
        The chunks, longest rows first.
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    lengths = inputs["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    n = len(order)
    if max_rows:
        sizes = [min(max_rows, n - i) for i in range(0, n, max_rows)]
    else:
        if overhead_tokens is None:
            overhead_tokens = GROUP_OVERHEAD_TOKENS.get(lengths.device.type, GROUP_OVERHEAD_TOKENS["cuda"])
        sizes = _best_split(lengths[order].tolist(), overhead_tokens)
    chunks, start = [], 0
    for size in sizes:
        rows = order[start : start + size]
        start += size
        part = {k: v[rows] for k, v in inputs.items()}
        keep = part["attention_mask"].bool().any(dim=0)
        chunks.append(Chunk(rows, {k: v[:, keep] for k, v in part.items()}))
    return chunks


def _in_row_order(embeddings: Tensor, chunks: list[Chunk]) -> Tensor:
    """Chunk-ordered embeddings back in the batch's row order (differentiable)."""
    order = torch.cat([c.rows for c in chunks]).to(embeddings.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return embeddings[inverse]


def forward_chunks(encoder: torch.nn.Module, chunks: list[Chunk]) -> Tensor:
    """Embeddings ``(N, D)`` of all rows, in row order, with a graph (the plain step's forward)."""
    return _in_row_order(torch.cat([encoder(c.inputs) for c in chunks]), chunks)


def _split_views(embeddings: Tensor, view_rows: int) -> list[Tensor]:
    """``[anchor, positive(, negative)]`` from the concatenated ``(V * B, D)`` embeddings."""
    if embeddings.shape[0] % view_rows:
        raise ValueError(f"{embeddings.shape[0]} rows are not a whole number of views of {view_rows}")
    return list(embeddings.split(view_rows))


def grad_cache_step(encoder: torch.nn.Module, chunks: list[Chunk], loss_fn: LossFn, view_rows: int) -> dict[str, Tensor]:
    """Back-propagate the full-batch loss into ``encoder`` one chunk at a time (gradients accumulate).

    With ``Z = [f(X_1); ...; f(X_K)]`` the concatenated chunk embeddings and ``G = dL/dZ``, the
    parameter gradient ``sum_k G_k^T dZ_k/dtheta`` is accumulated by ``f(X_k).backward(G_k)``.
    The caller zeroes gradients before and steps the optimizer after (and, distributed, all-reduces
    once after this function: no communication happens per chunk).

    Args:
        encoder: Maps one input dict to ``(rows, D)`` embeddings (in training mode).
        chunks: The rows of all views concatenated, in chunks (:func:`length_chunks`).
        loss_fn: Maps the list of view embeddings to named loss terms with ``loss``.
        view_rows: Rows per view (B); the concatenated rows are ``V * B``.

    Returns:
        The loss terms, detached.
    """
    device = _device_of(encoder)
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState.capture(device))
            cached.append(encoder(chunk.inputs))
    embeddings = torch.cat(cached).requires_grad_()
    terms = loss_fn(_split_views(_in_row_order(embeddings, chunks), view_rows))
    terms["loss"].backward()  # stops at the embeddings: they are a leaf here
    grads = embeddings.grad.split([c.shape[0] for c in cached])  # type: ignore[union-attr]
    for chunk, state, grad in zip(chunks, states, grads):
        with state.replay():
            encoder(chunk.inputs).backward(grad)
    return {k: v.detach() for k, v in terms.items()}


def chunked_reference_step(encoder: torch.nn.Module, chunks: list[Chunk], loss_fn: LossFn, view_rows: int) -> dict[str, Tensor]:
    """Plain back-propagation through the same chunked forwards (the GradCache test reference).

    Forwards the chunks in order with a graph from the current random state, so each chunk draws
    the same dropout masks as :func:`grad_cache_step`'s first pass does from the same state.
    Memory grows with the whole batch; use it to check, not to train.

    Args:
        encoder: As for :func:`grad_cache_step`.
        chunks: As for :func:`grad_cache_step`.
        loss_fn: As for :func:`grad_cache_step`.
        view_rows: As for :func:`grad_cache_step`.

    Returns:
        The loss terms, detached.
    """
    terms = loss_fn(_split_views(forward_chunks(encoder, chunks), view_rows))
    terms["loss"].backward()
    return {k: v.detach() for k, v in terms.items()}


def _device_of(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter (the one whose generator dropout draws from)."""
    return next(module.parameters()).device
