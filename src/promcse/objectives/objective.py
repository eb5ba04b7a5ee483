"""The one entry point from a loss config to a training objective: :func:`build_objective`.

An :class:`Objective` maps the views of a batch, ``[anchor, positive(, hard negative)]`` embeddings, to
named loss terms (``loss`` is minimised; the others are logged), and says what data it needs. Both
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from promcse.objectives.losses import contrastive_loss, distill_contrastive, distill_similarity, same_text_columns, supcon_views
from promcse.objectives.tiled import tiled_contrastive_loss

if TYPE_CHECKING:
    from promcse.training.config import LossConfig

# name -> whether the energy-based hinge term is part of it (and so hard negatives are required).
OBJECTIVES: dict[str, bool] = {"nt_xent": False, "nt_xent_eh": True, "supcon": False, "distill": False}
CONTRASTIVE = frozenset({"nt_xent", "nt_xent_eh", "supcon"})  # objectives with a contrastive term (L_CL or L_SC)
DISTILL_LOSSES = ("similarity", "contrastive")  # loss.distill choices (Objective.distill_terms)


@dataclass(frozen=True)
class Objective:
    """A configured contrastive objective over view embeddings.

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
    def contrastive(self) -> bool:
        """Has the contrastive term (every objective but ``distill``)."""
        return self.name in CONTRASTIVE

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

    @property
    def needs_hard_negatives(self) -> bool:
        """The training data must have a ``hard_neg`` column."""
        return OBJECTIVES[self.name] or self.hard_negative_weight != 0.0

    @property
    def needs_labels(self) -> bool:
        """The training data must carry class labels (a ``label`` column): ``supcon``."""
        return self.name == "supcon"

    def __call__(self, views: Sequence[Tensor], offset: int = 0, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Loss terms of ``views = [anchor (B, D), positive (M, D), negative_1 (M, D), ..., negative_k (M, D)]``.

        ``k = 0`` (pairs or dropout views), 1 (triplets) or more (mined ``hard_neg_1..k``); the negatives
        become k column blocks of one similarity matrix. ``offset`` is the row of anchor 0's positive among
        the positives (> 0 when the positives were gathered from several processes). ``labels``: ``(B,)``
        class ids of the rows, for ``supcon`` (one process: anchors and positives are the same B rows).

        Raises:
            ValueError: ``supcon`` without labels, or with positives gathered from several processes.
        """
        negative = torch.cat(list(views[2:])) if len(views) > 2 else None
        if self.name == "supcon":
            if labels is None or views[1].shape[0] != views[0].shape[0]:
                raise ValueError("supcon needs the batch's labels and the anchors' own positives (one process)")
            return supcon_views(views[0], views[1], negative, labels=labels, temperature=self.temperature)
        kwargs = {"temperature": self.temperature, "hard_negative_weight": self.hard_negative_weight,
                  "eh_weight": self.eh_weight, "eh_margin": self.eh_margin, "offset": offset}
        if self.tile_size > 0:
            return tiled_contrastive_loss(views[0], views[1], negative, tile_size=self.tile_size, **kwargs)
        return contrastive_loss(views[0], views[1], negative, **kwargs)


def build_objective(loss: LossConfig) -> Objective:
    """The objective a ``loss`` config section describes (names checked by :func:`promcse.training.config.validate`)."""
    eh = OBJECTIVES[loss.name]
    return Objective(name=loss.name, temperature=loss.temperature, hard_negative_weight=loss.hard_negative_weight,
                     eh_weight=loss.eh_weight if eh else 0.0, eh_margin=loss.eh_margin, tile_size=loss.tile_size,
                     distill=loss.distill if loss.distill_teacher else "", distill_weight=loss.distill_weight,
                     distill_temperature=loss.distill_temperature)
