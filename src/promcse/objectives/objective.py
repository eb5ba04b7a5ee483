"""The objective registry and the one place where a step's loss is composed: :meth:`Objective.compose`.

:data:`OBJECTIVES` maps each ``loss.name`` to its term function and what it needs (hard negatives, labels,
tiling, several processes). An :class:`Objective` maps the views of a batch, ``[anchor, positive(, hard
negative)]`` embeddings, to named loss terms, every one weighted and summed into ``loss`` here (the training
step only backpropagates ``loss``; the other terms are logged). A ``loss`` config section becomes an
Objective through :func:`promcse.training.config.build_objective`. Both
objectives are the PromCSE objective ``L = L_CL + lambda * L_EH`` (:func:`promcse.objectives.losses.contrastive_loss`)::

    L_CL = -(1/B) sum_i log( e^{s_ii} / (sum_j e^{s_ij} + sum_j e^{cos(z1_i, z3_j)/tau + w [j = i]}) )
    L_EH = (1/B) sum_i max(0, m - cos(h_i, h+_i) + max(max_{j != i} cos(h_i, h+_j), max_j cos(h_i, h-_j)))

``nt_xent`` is L_CL alone (SimCSE; unsupervised PromCSE), ``nt_xent_eh`` adds the energy-based hinge with
weight lambda (supervised PromCSE, hard negatives required). ``supcon`` takes class labels (a ``label`` column)
instead: SupCon (Khosla et al. 2020, :func:`promcse.objectives.losses.supcon_views`) over ``cat(anchors, positives)``,
every view of the same class a positive::

    L_SC = mean_{i : |P(i)| > 0} -1/|P(i)| sum_{p in P(i)} log( e^{s_ip} / sum_{a != i} e^{s_ia} ),
    P(i) = {p != i : y_p = y_i}, s_ia = cos(z_i, z_a) / tau

With a teacher (``loss.distill_teacher``) every
objective adds ``mu * L_D``, a distillation term on the local views (:func:`promcse.objectives.losses.distill_similarity`,
leaving out the columns of each anchor's own text, or :func:`promcse.objectives.losses.distill_contrastive`); ``distill`` is that term alone. ``loss.tile_size > 0`` computes the same
values and gradients in tiles (:func:`promcse.objectives.tiled.tiled_contrastive_loss`): a parameter, not another loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from promcse.objectives.losses import contrastive_loss, distill_contrastive, distill_similarity, same_text_columns, supcon_views
from promcse.objectives.tiled import tiled_contrastive_loss

DISTILL_LOSSES = ("similarity", "contrastive")  # loss.distill choices (Objective.distill_terms)

# (objective, views, offset of anchor 0's positive, labels or None) -> named terms with "loss"
TermFn = Callable[["Objective", Sequence[Tensor], int, "Tensor | None"], dict[str, Tensor]]


def _contrastive_terms(objective: Objective, views: Sequence[Tensor], offset: int, labels: Tensor | None) -> dict[str, Tensor]:
    """NT-Xent (+ energy hinge when ``eh_weight`` > 0), dense or in tiles of ``tile_size``."""
    negative = torch.cat(list(views[2:])) if len(views) > 2 else None
    kwargs = {"temperature": objective.temperature, "hard_negative_weight": objective.hard_negative_weight,
              "eh_weight": objective.eh_weight, "eh_margin": objective.eh_margin, "offset": offset}
    if objective.tile_size > 0:
        return tiled_contrastive_loss(views[0], views[1], negative, tile_size=objective.tile_size, **kwargs)
    return contrastive_loss(views[0], views[1], negative, **kwargs)


def _supcon_terms(objective: Objective, views: Sequence[Tensor], offset: int, labels: Tensor | None) -> dict[str, Tensor]:
    """SupCon over ``cat(anchors, positives)``; hard negatives only join the denominators."""
    if labels is None or views[1].shape[0] != views[0].shape[0]:
        raise ValueError("supcon needs the batch's labels and the anchors' own positives (one process)")
    negative = torch.cat(list(views[2:])) if len(views) > 2 else None
    return supcon_views(views[0], views[1], negative, labels=labels, temperature=objective.temperature)


@dataclass(frozen=True)
class ObjectiveKind:
    """One entry of :data:`OBJECTIVES`: its contrastive term and what it needs and allows.

    Attributes:
        terms: The contrastive term function; None for an objective that is distillation alone.
        eh: The energy-based hinge is part of it (so hard negatives are required).
        labels: Needs class labels (a ``label`` column).
        tiles: Can be computed in tiles (``loss.tile_size``).
        bonus: Takes a logit bonus on each row's own hard negative (``loss.hard_negative_weight``).
        multi_process: Runs across several processes (its inputs can be gathered).
    """

    terms: TermFn | None
    eh: bool = False
    labels: bool = False
    tiles: bool = True
    bonus: bool = True
    multi_process: bool = True


OBJECTIVES: dict[str, ObjectiveKind] = {
    "nt_xent": ObjectiveKind(_contrastive_terms),
    "nt_xent_eh": ObjectiveKind(_contrastive_terms, eh=True),
    "supcon": ObjectiveKind(_supcon_terms, labels=True, tiles=False, bonus=False, multi_process=False),
    "distill": ObjectiveKind(None, tiles=False),
}
CONTRASTIVE = frozenset(name for name, kind in OBJECTIVES.items() if kind.terms is not None)


@dataclass(frozen=True)
class Objective:
    """A configured objective over view embeddings.

    Attributes:
        name: Key of :data:`OBJECTIVES`.
        temperature: tau.
        hard_negative_weight: w, logit bonus on each row's own hard negative.
        eh_weight: lambda (0 for ``nt_xent``).
        eh_margin: m.
        tile_size: Tile rows/columns for the memory-bounded form; 0 = dense.
        distill: ``""`` (no teacher), ``similarity`` or ``contrastive``.
        distill_weight: mu, the weight of the distillation term.
        distill_temperature: tau of the distillation loss.
    """

    name: str
    temperature: float = 0.05
    hard_negative_weight: float = 0.0
    eh_weight: float = 0.0
    eh_margin: float = 0.2
    tile_size: int = 0
    distill: str = ""
    distill_weight: float = 1.0
    distill_temperature: float = 0.05

    @property
    def kind(self) -> ObjectiveKind:
        """The registry entry of :attr:`name`."""
        return OBJECTIVES[self.name]

    @property
    def contrastive(self) -> bool:
        """Has the contrastive term (every objective but ``distill``)."""
        return self.kind.terms is not None

    @property
    def needs_hard_negatives(self) -> bool:
        """The training data must have a ``hard_neg`` column."""
        return self.kind.eh or self.hard_negative_weight != 0.0

    @property
    def needs_labels(self) -> bool:
        """The training data must carry class labels (a ``label`` column): ``supcon``."""
        return self.kind.labels

    def distill_terms(self, local: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """The distillation term on this process's views and the teacher's embeddings of the same texts.

        ``similarity``: KL of in-batch similarity distributions, anchors against every view but those of the
        anchor's own text (:func:`promcse.objectives.losses.same_text_columns`);
        ``contrastive``: student anchors against the teacher's anchors (same dimension).
        """
        if self.distill == "contrastive":
            return distill_contrastive(local[0], teacher[0], self.distill_temperature)
        columns = torch.cat(list(teacher))
        return distill_similarity(local[0], torch.cat(list(local)), teacher[0], columns, self.distill_temperature,
                                  exclude=same_text_columns(teacher[0], columns))

    def __call__(self, views: Sequence[Tensor], offset: int = 0, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Contrastive terms of ``views = [anchor (B, D), positive (M, D), negative_1 (M, D), ..., negative_k (M, D)]``.

        ``k = 0`` (pairs or dropout views), 1 (triplets) or more (mined ``hard_neg_1..k``); the negatives
        become k column blocks of one similarity matrix. ``offset`` is the row of anchor 0's positive among
        the positives (> 0 when the positives were gathered from several processes). ``labels``: ``(B,)``
        class ids of the rows, for ``supcon`` (one process: anchors and positives are the same B rows).

        Raises:
            ValueError: ``distill`` (no contrastive term); ``supcon`` without labels, or with positives
                gathered from several processes.
        """
        if self.kind.terms is None:
            raise ValueError(f"objective {self.name!r} has no contrastive term")
        return self.kind.terms(self, views, offset, labels)

    def compose(self, views: Sequence[Tensor] | None, offset: int = 0, labels: Tensor | None = None,
                local: Sequence[Tensor] | None = None, teacher: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """Every term of one step, weighted and summed into ``loss``: ``loss = L_contrastive + mu * L_D``.

        ``views``: the (gathered) views for the contrastive term, or None when the batch takes none (a
        distillation-only source, or ``distill``); ``local`` and ``teacher``: this process's views and the
        teacher's embeddings of the same texts, for the distillation term (``teacher=None``: none).
        """
        terms: dict[str, Tensor] = dict(self(views, offset, labels)) if views is not None and self.contrastive else {}
        if teacher is not None and local is not None:
            terms["distill"] = self.distill_terms(local, teacher)
            weighted = self.distill_weight * terms["distill"]
            terms["loss"] = terms["loss"] + weighted if "loss" in terms else weighted
        return terms
