"""Tiled contrastive loss: NT-Xent and the energy hinge without ever forming the similarity matrix.

The dense loss (:func:`promcse.objectives.losses.contrastive_loss`) builds ``sim = a @ [p; n]^T`` of shape
``(B, M)`` or ``(B, 2M)`` and keeps it (plus its softmax) for backward: O(B^2) memory, 64 MB per copy at
B = 4096 with hard negatives. Here rows and columns are visited in ``t x t`` tiles (Inf-CL, "Breaking
the Memory Barrier", Cheng et al. 2024; the online log-sum-exp of FlashAttention):

* forward keeps, per anchor row i, only ``lse_i = log sum_j e^{l_ij}`` (merged tile by tile with a
  running max), the hardest negative cosine ``h_i`` and how many columns tie for it;
* backward recomputes each tile's cosines and uses ``softmax_ij = e^{l_ij - lse_i}``, so peak extra
  memory is O(t^2 + B) instead of O(B * M).

Values and gradients equal the dense loss (same formulas; see :func:`promcse.objectives.losses.nt_xent` and
:func:`promcse.objectives.losses.energy_hinge`), including ``offset`` (distributed columns), ``M > B``, the paired
hard-negative bonus ``w`` and ties in the hinge's inner max (gradient shared equally, as ``amax``).
Pure PyTorch: runs wherever ``torch.mm`` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_TILE = 1024


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in pieces of at most ``tile``."""
    return [(i, min(i + tile, n)) for i in range(0, n, tile)]


def _own_column(r0: int, r1: int, first: int, c0: int, c1: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows (tile-local) of anchors ``r0..r1`` whose column ``first + i`` falls in tile ``c0..c1``.

    Returns:
        ``(rows, cols)`` tile-local index tensors (possibly empty).
    """
    col = first + torch.arange(r0, r1, device=device) - c0
    rows = torch.nonzero((col >= 0) & (col < c1 - c0)).squeeze(1)
    return rows, col[rows]


def _tile(a: Tensor, c: Tensor, r: tuple[int, int], k: tuple[int, int], cfg: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Cosines, logits and hinge candidates of one tile.

    Returns:
        ``(s, logits, cand)``: ``s`` plain cosines; ``logits = s / tau`` plus the bonus ``w`` on each
        row's paired hard negative (column ``M + offset + i``); ``cand`` = ``s`` with each row's own
        positive (column ``offset + i``) set to -inf, i.e. the hinge's negatives.
    """
    s = a[r[0]:r[1]] @ c[k[0]:k[1]].T
    logits = s / cfg["tau"]
    if cfg["bonus"] != 0.0:
        for block in range(1, cfg["blocks"] + 1):
            rows, cols = _own_column(r[0], r[1], block * cfg["m"] + cfg["offset"], k[0], k[1], s.device)
            logits[rows, cols] += cfg["bonus"]
    cand = s
    if cfg["eh"]:
        rows, cols = _own_column(r[0], r[1], cfg["offset"], k[0], k[1], s.device)
        cand = s.clone()
        cand[rows, cols] = float("-inf")
    return s, logits, cand


def _forward_stats(a: Tensor, c: Tensor, cfg: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``lse_i``, hardest negative ``h_i = max_{j != o+i} s_ij`` and its tie count.

    Online log-sum-exp: with running max ``mx`` and sum ``se``, a tile with max ``tm`` updates
    ``mx' = max(mx, tm)``, ``se' = se * e^{mx - mx'} + sum_j e^{l_j - mx'}``; ``lse = mx + log se``.
    """
    rows = a.shape[0]
    mx = a.new_full((rows,), float("-inf"))
    se = a.new_zeros(rows)
    hard = a.new_full((rows,), float("-inf"))
    count = a.new_zeros(rows)
    for r in _spans(rows, cfg["tile"]):
        for k in _spans(c.shape[0], cfg["tile"]):
            _, logits, cand = _tile(a, c, r, k, cfg)
            new = torch.maximum(mx[r[0]:r[1]], logits.amax(dim=1))
            se[r[0]:r[1]] = se[r[0]:r[1]] * torch.exp(mx[r[0]:r[1]] - new) + torch.exp(logits - new[:, None]).sum(1)
            mx[r[0]:r[1]] = new
            if cfg["eh"]:
                tmax = cand.amax(dim=1)
                tcount = (cand == tmax[:, None]).sum(1).to(a.dtype)
                old = hard[r[0]:r[1]]
                count[r[0]:r[1]] = torch.where(tmax > old, tcount, count[r[0]:r[1]] + (tmax == old) * tcount)
                hard[r[0]:r[1]] = torch.maximum(old, tmax)
    return mx + torch.log(se), hard, count


class _TiledContrastive(torch.autograd.Function):
    """``(L_CL, L_EH)`` of normalised anchors ``a`` (B, D) against columns ``c`` (K, D), tile by tile."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, c: Tensor, cfg: dict[str, Any]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        dtype = a.dtype
        a, c = a.float(), c.float()  # fp32 statistics even under autocast (exp/log of logits up to 1/tau)
        rows = a.shape[0]
        pos = (a * c[cfg["offset"]:cfg["offset"] + rows]).sum(1)  # s_{i, o+i}; never gets the bonus
        lse, hard, count = _forward_stats(a, c, cfg)
        ce = (lse - pos / cfg["tau"]).mean()
        active = (cfg["margin"] - pos + hard > 0).to(a.dtype) if cfg["eh"] else a.new_zeros(rows)
        eh = (F.relu(cfg["margin"] - pos + hard)).mean() if cfg["eh"] else a.new_zeros(())
        ctx.save_for_backward(a, c, lse, hard, count, active)
        ctx.cfg, ctx.dtype = cfg, dtype
        return ce, eh

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor, g_eh: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, c, lse, hard, count, active = ctx.saved_tensors
        cfg = ctx.cfg
        rows = a.shape[0]
        # dL/ds_ij = g_ce/(B tau) (softmax_ij - [j = o+i]) + g_eh/B * active_i ([j ties h_i]/count_i - [j = o+i])
        ce_scale = g_ce.float() / (rows * cfg["tau"])
        eh_scale = g_eh.float() * active / (rows * count.clamp(min=1))
        grad_a, grad_c = torch.zeros_like(a), torch.zeros_like(c)
        for r in _spans(rows, cfg["tile"]):
            for k in _spans(c.shape[0], cfg["tile"]):
                _, logits, cand = _tile(a, c, r, k, cfg)
                g = torch.exp(logits - lse[r[0]:r[1], None]) * ce_scale
                if cfg["eh"]:
                    g = g + (cand == hard[r[0]:r[1], None]) * eh_scale[r[0]:r[1], None]
                grad_a[r[0]:r[1]] += g @ c[k[0]:k[1]]
                grad_c[k[0]:k[1]] += g.T @ a[r[0]:r[1]]
        # The "- [j = o+i]" parts touch one column per row: add them without a tile.
        own = (ce_scale + g_eh.float() * active / rows)[:, None]
        target = c[cfg["offset"]:cfg["offset"] + rows]
        grad_a -= own * target
        grad_c[cfg["offset"]:cfg["offset"] + rows] -= own * a
        return grad_a.to(ctx.dtype), grad_c.to(ctx.dtype), None


def _check(anchor: Tensor, positive: Tensor, negative: Tensor | None, temperature: float,
           hard_negative_weight: float, eh_weight: float, offset: int, tile_size: int) -> None:
    """Raise ``ValueError`` on the inputs the dense loss also rejects (same messages' meaning)."""
    if anchor.dim() != 2 or positive.dim() != 2 or anchor.shape[1] != positive.shape[1]:
        raise ValueError(f"need anchor (B, D) and positive (M, D), got {tuple(anchor.shape)} and {tuple(positive.shape)}")
    if negative is not None and (negative.dim() != 2 or negative.shape[1] != positive.shape[1]
                                 or negative.shape[0] == 0 or negative.shape[0] % positive.shape[0]):
        raise ValueError(f"negative shape {tuple(negative.shape)} is not k blocks of the positive shape {tuple(positive.shape)}")
    if offset < 0 or offset + anchor.shape[0] > positive.shape[0]:
        raise ValueError(f"offset {offset} + {anchor.shape[0]} anchors exceeds the {positive.shape[0]} positive columns")
    if temperature <= 0 or tile_size <= 0 or eh_weight < 0:
        raise ValueError(f"need temperature > 0, tile_size > 0, eh_weight >= 0; got {temperature}, {tile_size}, {eh_weight}")
    if hard_negative_weight != 0.0 and negative is None:
        raise ValueError("hard_negative_weight needs hard negatives")
    if eh_weight > 0 and negative is None and positive.shape[0] < 2:
        raise ValueError("energy_hinge needs at least one negative column")


def tiled_contrastive_loss(
    anchor: Tensor, positive: Tensor, negative: Tensor | None = None, *, temperature: float = 0.05,
    hard_negative_weight: float = 0.0, eh_weight: float = 0.0, eh_margin: float = 0.2, offset: int = 0,
    tile_size: int = DEFAULT_TILE,
) -> dict[str, Tensor]:
    """PromCSE objective ``L = L_CL + lambda * L_EH`` in ``tile_size``-square tiles (memory O(t^2 + B)).

    Same formulas, arguments and result as :func:`promcse.objectives.losses.contrastive_loss`::

        L_CL = -(1/B) sum_i log( e^{s_{i,o+i}} / (sum_j e^{s_ij} + sum_j e^{n_ij + w [j = o+i]}) )
        L_EH = (1/B) sum_i max(0, m - cos_{i,o+i} + max(max_{j != o+i} cos(h_i, h+_j), max_j cos(h_i, h-_j)))

    with ``s = cos / tau``. The gradient is exact (not an approximation): backward recomputes each
    tile's cosines from the saved per-row log-sum-exp and hardest-negative value.

    Args:
        anchor: ``(B, D)``.
        positive: ``(M, D)``, ``M >= B``; anchor ``i``'s positive is row ``offset + i``.
        negative: Optional ``(kM, D)`` hard negatives in k blocks, row ``tM + j`` paired with positive ``j``.
        temperature: tau.
        hard_negative_weight: w, logit bonus on the paired hard negative.
        eh_weight: lambda; the hinge is computed only when > 0.
        eh_margin: m.
        offset: Row of anchor 0's positive among the positives.
        tile_size: Rows and columns per tile.

    Returns:
        ``{"nt_xent", ["energy_hinge",] "loss"}``, all scalars.

    Raises:
        ValueError: On mismatched shapes or invalid settings.
    """
    _check(anchor, positive, negative, temperature, hard_negative_weight, eh_weight, offset, tile_size)
    columns = positive if negative is None else torch.cat([positive, negative], dim=0)
    cfg = {"tau": temperature, "bonus": hard_negative_weight, "margin": eh_margin, "eh": eh_weight > 0,
           "offset": offset, "m": positive.shape[0], "tile": tile_size,
           "blocks": 0 if negative is None else negative.shape[0] // positive.shape[0]}
    ce, eh = _TiledContrastive.apply(F.normalize(anchor, dim=-1), F.normalize(columns, dim=-1), cfg)
    terms = {"nt_xent": ce, "loss": ce}
    if eh_weight > 0:
        terms["energy_hinge"] = eh
        terms["loss"] = ce + eh_weight * eh
    return terms
