"""Multi-process data-parallel training (``torchrun``) with negatives gathered from every process.

Each of W processes ("ranks") takes a disjoint, contiguous shard of ``b = N / W`` rows of every
global batch of N rows. Its anchors are scored against the positives and hard negatives of *all*
ranks, gathered with gradients, so every anchor sees the negatives of the whole global batch::

    L = (1/W) sum_r L_r,   L_r = NT-Xent(+EH) of rank r's b anchors vs. all N positives (+ N negatives)

with rank r's anchor i matched to global column ``r * b + i`` (``offset = r * b``). Because the
local batches are equal, the mean of the local means is the global mean, and the gradient is
exactly that of one process with the concatenated batch:

* the gather's backward sums, over ranks, the gradient each rank's loss puts on every gathered row
  and hands each rank the rows it owns (``dL_r/dZ_s`` reaches rank s for every r) - a
  reduce-scatter (on gloo, which lacks one, W scatters and a local sum);
* after the step's backward pass(es) - one, or one per GradCache chunk - the trainable gradients
  are averaged with ONE all-reduce (no per-chunk synchronisation, unlike DDP hooks firing inside
  every chunk's backward). The loss terms ride in the same all-reduce, so every rank logs the
  global loss.

Backends: NCCL when training on CUDA, gloo on CPU. Evaluation and checkpoints happen on rank 0
only (see :func:`promcse.training.train.train`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank (0 = main: evaluates, checkpoints, logs).
        world_size: Number of processes W.
        local_rank: Rank on this machine (selects the GPU).
        owns_group: Whether :func:`setup` created the process group (and :func:`teardown` ends it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0


def context() -> DistContext:
    """The current process's place in an initialised process group (single process if none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistContext(dist.get_rank(), dist.get_world_size(), local)


def setup(device: torch.device) -> DistContext:
    """Join the job ``torchrun`` started (env ``WORLD_SIZE`` > 1); a no-op for a single process.

    NCCL for CUDA (and this rank's GPU becomes the current device, so ``.to("cuda")`` lands on
    ``cuda:LOCAL_RANK``), gloo for CPU. A group that already exists is used as it is.

    Args:
        device: The device training will run on (its type picks the backend).

    Returns:
        The context; ``owns_group`` tells :func:`teardown` to destroy the group at the end.
    """
    if dist.is_available() and dist.is_initialized():
        return context()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=True)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def fit_batches(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Trim every global batch to a multiple of W rows (so shards are equal); drop the empty ones.

    Equal shards keep ``mean_r L_r`` equal to the global mean and the gathered shapes identical.
    """
    if world_size == 1:
        return batches
    trimmed = [b[: len(b) // world_size * world_size] for b in batches]
    return [b for b in trimmed if len(b) >= max(2, world_size)]


def shard_rows(rows: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Rank r's contiguous shard ``rows[r*b : (r+1)*b]`` of a global batch, ``b = N / W``.

    Raises:
        ValueError: If N is not a multiple of W (use :func:`fit_batches`).
    """
    if ctx.world_size == 1:
        return rows
    if len(rows) % ctx.world_size:
        raise ValueError(f"a global batch of {len(rows)} rows does not split over {ctx.world_size} ranks")
    local = len(rows) // ctx.world_size
    return rows[ctx.rank * local : (ctx.rank + 1) * local]


def _gather_rows(local: Tensor) -> Tensor:
    """``all_gather`` along rows whose backward returns each rank the summed gradient of its rows.

    Forward: ``(b, D)`` per rank -> ``(W * b, D)``, rank r's rows at ``r*b .. (r+1)*b - 1``.
    Backward: ``dL/dZ_r = sum_s dL_s/dZ_r``. Both are the library's
    :func:`torch.distributed.nn.functional.all_gather` (a tuple of W per-rank tensors; this rank's
    slot is a copy whose gradient arrives through the same sum). Its backward is one
    ``reduce_scatter`` on NCCL; gloo has no reduce-scatter, so there it is W ``scatter`` calls (rank
    s sends each rank the gradient its loss put on that rank's rows) and a local sum.

    The function is marked deprecated (``FutureWarning``, in favour of the private
    ``torch.distributed._functional_collectives``); the warning is silenced around this call only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_nn.all_gather(local.contiguous())
    return torch.cat(parts)


def gather_columns(views: list[Tensor], ctx: DistContext) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Local anchors; positives and hard negatives of all ranks (with gradients); the label offset.

    Positives and negatives travel in one collective, stacked per rank, so global negative j of every
    block stays paired with global positive j (the hard-negative bonus and the hinge rely on it).

    Args:
        views: ``[anchor, positive, negative_1, ..., negative_k]`` (k >= 0), each ``(b, D)`` on this rank.
        ctx: The job context.

    Returns:
        ``(anchor (b, D), positive (W*b, D), negative (k*W*b, D) in k blocks or None, offset = rank * b)``.
    """
    anchor = views[0]
    if ctx.world_size == 1:
        negative = torch.cat(views[2:]) if len(views) > 2 else None
        return anchor, views[1], negative, 0
    local = anchor.shape[0]
    stacked = torch.cat(views[1:])  # ((1+k)*b, D): positives, then each block of negatives
    gathered = _gather_rows(stacked).view(ctx.world_size, len(views) - 1, local, -1)
    columns = gathered.transpose(0, 1).reshape(len(views) - 1, ctx.world_size * local, -1)
    negative = columns[1:].reshape(-1, columns.shape[-1]) if len(views) > 2 else None
    return anchor, columns[0], negative, ctx.rank * local


def all_reduce_gradients(params: list[torch.nn.Parameter], terms: dict[str, Tensor], ctx: DistContext) -> dict[str, Tensor]:
    """Average trainable gradients and loss terms over ranks with a single all-reduce.

    With rank r's loss ``L_r`` a mean over its own anchors and the gather's backward already
    summing cross-rank terms, ``(1/W) sum_r grad_r = d/dtheta (1/W) sum_r L_r``, the global-batch
    gradient. Gradients of None (parameter unused this step) count as zeros.

    Returns:
        The loss terms averaged over ranks (the global-batch values); unchanged for one process.
    """
    if ctx.world_size == 1:
        return terms
    names = sorted(terms)
    device = params[0].device if params else next(iter(terms.values())).device
    pieces = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device, dtype=p.dtype) for p in params]
    pieces.append(torch.stack([terms[n].detach().float().to(device) for n in names]))
    flat = torch.cat([x.float() for x in pieces])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    start = 0
    for p in params:
        p.grad = flat[start : start + p.numel()].view_as(p).to(p.dtype)
        start += p.numel()
    return dict(zip(names, flat[start:].unbind()))


def broadcast_parameters(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Copy rank 0's trainable parameters to every rank (same start even if the seeding differed)."""
    if ctx.world_size == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def effective_negatives(global_batch: int, has_hard_negatives: bool) -> int:
    """Negatives in each anchor's softmax denominator: ``N - 1`` other positives (+ ``N`` hard negatives)."""
    return global_batch - 1 + (global_batch if has_hard_negatives else 0)


def describe_scale(local_batch: int, ctx: DistContext, has_hard_negatives: bool, chunk: int) -> str:
    """One log line: processes, batch per process, global batch, negatives per anchor, chunking."""
    n = local_batch * ctx.world_size
    chunks = f"GradCache chunks of {chunk} rows" if chunk else "no GradCache"
    return (f"{ctx.world_size} process(es) x {local_batch} rows = global batch {n}; each anchor is contrasted "
            f"with {effective_negatives(n, has_hard_negatives)} negatives; {chunks}")
