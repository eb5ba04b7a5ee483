"""Several training files in one run (``data.sources``): :class:`Mixture` and its step order.

Each step's batch comes from ONE source, drawn by weight, so a batch is homogeneous in its views
(dropout pairs from a sentence file, triplets from an NLI file, rows with k mined negatives...) and the
loss sees one layout per step. Rows are numbered globally (source 0's rows first, then source 1's...),
so the loop, sharding and resumption work on plain index arrays as for one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from promcse.io.data import TrainExamples, batch_order, batch_views


@dataclass(frozen=True)
class Mixture:
    """Training sources sampled by weight.

    Attributes:
        parts: The sources' examples.
        weights: Relative share of the steps drawn from each source (> 0).
        contrastive: Per source, whether its batches take the contrastive term (False: distillation only).
    """

    parts: tuple[TrainExamples, ...]
    weights: tuple[float, ...]
    contrastive: tuple[bool, ...]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    @cached_property
    def starts(self) -> list[int]:
        """Global index of each source's first row (computed once: every step looks it up twice)."""
        return [int(x) for x in np.cumsum([0] + [len(p) for p in self.parts[:-1]])]

    @property
    def source(self) -> str:
        """The files, for messages."""
        return " + ".join(part.source for part in self.parts)

    @property
    def has_hard_negatives(self) -> bool:
        """Every source has hard negatives."""
        return all(part.has_hard_negatives for part in self.parts)

    def part_of(self, rows: np.ndarray) -> int:
        """The one source that global ``rows`` belong to.

        Raises:
            ValueError: When the rows span two sources (batches are built within one).
        """
        starts = self.starts
        which = {int(np.searchsorted(starts, int(r), side="right")) - 1 for r in rows}
        if len(which) != 1:
            raise ValueError(f"a batch spans sources {sorted(which)}; batches must come from one source")
        return which.pop()

    def views(self, rows: np.ndarray) -> list[list[str]]:
        """The views of a batch, from its source."""
        k = self.part_of(rows)
        return batch_views(self.parts[k], np.asarray(rows) - self.starts[k])

    def is_contrastive(self, rows: np.ndarray) -> bool:
        """Whether the batch's source takes the contrastive term."""
        return self.contrastive[self.part_of(rows)]

    def labels_of(self, rows: np.ndarray) -> np.ndarray | None:
        """The class ids of a batch, from its source (ids are per file: a batch never mixes files)."""
        k = self.part_of(rows)
        return self.parts[k].labels_of(np.asarray(rows) - self.starts[k])

    def texts(self) -> list[str]:
        """Every text of every source."""
        return [text for part in self.parts for text in part.texts()]


def mixture_batch_order(mixture: Mixture, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Global row indices per step: as many steps as the sources' own batches over ``epochs``.

    Step t draws source ``s ~ weights`` (one seeded draw for the whole run), then takes that source's next
    batch from its own shuffled order, reshuffled (new seed) whenever it runs out. A pure function of its
    arguments, so a resumed run finds its place from the step number alone.
    """
    orders = [batch_order(len(part), batch_size, 1, seed + 1 + k) for k, part in enumerate(mixture.parts)]
    total = epochs * sum(len(order) for order in orders)
    weights = np.asarray(mixture.weights, dtype=np.float64)
    draws = np.random.default_rng(seed).choice(len(orders), size=total, p=weights / weights.sum())
    used, cycles = [0] * len(orders), [0] * len(orders)
    batches = []
    for k in draws:
        if used[k] == len(orders[k]):
            cycles[k] += 1
            orders[k] = batch_order(len(mixture.parts[k]), batch_size, 1, seed + 1 + k + 1000 * cycles[k])
            used[k] = 0
        batches.append(orders[k][used[k]] + mixture.starts[k])
        used[k] += 1
    return batches
