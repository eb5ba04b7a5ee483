"""Contrastive losses on sentence embeddings: pure functions of tensors, never of models.

Every loss is built from one cosine-similarity matrix (L2-normalise, then one matmul of the anchors
against ``[positives; hard negatives]``), shared by NT-Xent and the energy-based hinge; no ``(B, B, D)``
tensor is formed. ``sim`` is ``(B, M)`` or ``(B, (1+k)M)``: positive columns ``0..M-1``, then k blocks of M hard
negatives (negative ``j`` of block ``t`` paired with positive ``j``; k = 1 for triplets, k > 1 for rows with
several mined negatives ``hard_neg_1..hard_neg_k``). Anchor ``i``'s positive is column ``offset + i``; a
distributed loop uses ``offset > 0`` with ``M > B`` after gathering other ranks' rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarity_matrix(anchor: Tensor, positive: Tensor, negative: Tensor | None = None) -> Tensor:
    """Cosine similarities of anchors against positives and (optionally) hard negatives.

    ``sim[i, j] = cos(anchor_i, positive_j)`` for ``j < M`` and ``cos(anchor_i, negative_{j-M})`` after.

    Args:
        anchor: ``(B, D)`` anchor embeddings.
        positive: ``(M, D)`` positive embeddings, ``M >= B``.
        negative: Optional ``(kM, D)`` hard-negative embeddings in k blocks of M; row ``tM + j`` is paired
            with positive ``j``.

    Returns:
        ``(B, M)`` without negatives, ``(B, (1+k)M)`` with them (positive columns first).

    Raises:
        ValueError: If the shapes do not fit together.
    """
    a_shape, p_shape = tuple(anchor.shape), tuple(positive.shape)
    if len(a_shape) != 2 or len(p_shape) != 2 or a_shape[1] != p_shape[1] or p_shape[0] < a_shape[0]:
        raise ValueError(f"need anchor (B, D) and positive (M, D) with M >= B, got {a_shape} and {p_shape}")
    if negative is not None and (negative.dim() != 2 or negative.shape[1] != p_shape[1]
                                 or negative.shape[0] == 0 or negative.shape[0] % p_shape[0]):
        raise ValueError(f"negative shape {tuple(negative.shape)} is not k blocks of the positive shape {p_shape}")
    columns = positive if negative is None else torch.cat([positive, negative], dim=0)
    return F.normalize(anchor, dim=-1) @ F.normalize(columns, dim=-1).T


def _layout(sim: Tensor, offset: int, num_positives: int | None) -> tuple[int, int, int]:
    """Return ``(B, M, k)`` for a similarity matrix (k blocks of hard negatives), validating the offset."""
    if sim.dim() != 2:
        raise ValueError(f"sim must be 2-D, got shape {tuple(sim.shape)}")
    rows, cols = sim.shape
    if num_positives is None:
        if rows == 0 or cols % rows:  # only M = B can be inferred
            raise ValueError(f"sim {tuple(sim.shape)} is not (B, (1+k)B): pass num_positives")
        num_positives = rows
    if num_positives <= 0 or cols % num_positives:
        raise ValueError(f"sim has {cols} columns; expected a multiple of num_positives={num_positives}")
    if offset < 0 or offset + rows > num_positives:
        raise ValueError(f"offset {offset} + {rows} anchors exceeds the {num_positives} positive columns")
    return rows, num_positives, cols // num_positives - 1


def nt_xent(
    sim: Tensor, temperature: float = 0.05, hard_negative_weight: float = 0.0, offset: int = 0,
    *, num_positives: int | None = None,
) -> Tensor:
    """NT-Xent / InfoNCE loss with in-batch and hard negatives (SimCSE, Gao et al., EMNLP 2021).

    With ``s_ij = sim_ij / tau`` (positives) and ``n_ij = sim_{i,M+j} / tau`` (hard negatives)::

        L_CL = -(1/B) sum_i log( e^{s_{i,o+i}} / (sum_j e^{s_ij} + sum_j e^{n_ij + w [j = o+i]}) )

    where ``o = offset`` and ``w = hard_negative_weight`` is a logit bonus on the paired hard negative
    (as in SimCSE). With k hard negatives per row (k blocks of columns) the sum over ``j`` runs over every
    block and the bonus goes to each of the row's own k negatives. PromCSE (Jiang, Zhang, Wang, EMNLP 2022 Findings) uses this loss with w = 0.

    Args:
        sim: Cosine similarities from :func:`similarity_matrix` (not divided by tau).
        temperature: tau > 0.
        hard_negative_weight: Bonus added to the paired hard negative's logit; needs hard negatives.
        offset: Column of anchor 0's positive.
        num_positives: M, the number of positive columns. Inferred only when ``M == B``.

    Returns:
        Scalar mean loss.

    Raises:
        ValueError: On bad shapes, offset, temperature, or a weight without hard negatives.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows, m, blocks = _layout(sim, offset, num_positives)
    logits = sim / temperature
    idx = torch.arange(rows, device=sim.device)
    if hard_negative_weight != 0.0:
        if not blocks:
            raise ValueError("hard_negative_weight needs hard negatives (a (B, (1+k)M) sim matrix)")
        bonus = logits.new_full((rows,), hard_negative_weight)
        for block in range(1, blocks + 1):
            logits = logits.index_put((idx, block * m + offset + idx), bonus, accumulate=True)
    return F.cross_entropy(logits, idx + offset)


def energy_hinge(
    sim: Tensor, margin: float = 0.2, offset: int = 0, *, num_positives: int | None = None
) -> Tensor:
    """Energy-based hinge loss against the hardest negative (PromCSE, Jiang, Zhang, Wang, EMNLP 2022).

    With energy ``E = -cos`` and ``o = offset``::

        L_EH = (1/B) sum_i max(0, m - cos(h_i, h+_{o+i})
                               + max( max_{j != o+i} cos(h_i, h+_j), max_j cos(h_i, h-_j) ))

    The paper uses it with hard negatives (supervised NLI triplets, m = 0.2, weight 10); without them
    the hardest negative is taken over the other positives only. Ties in the inner max share the
    gradient equally (``amax``), so the result does not depend on batch order.

    Args:
        sim: Cosine similarities from :func:`similarity_matrix` (plain cosines, no temperature).
        margin: m.
        offset: Column of anchor 0's positive.
        num_positives: M, the number of positive columns. Inferred only when ``M == B``.

    Returns:
        Scalar mean loss.

    Raises:
        ValueError: On bad shapes or offset, or when there is no negative column at all.
    """
    rows, _, _ = _layout(sim, offset, num_positives)
    if sim.shape[1] < 2:
        raise ValueError("energy_hinge needs at least one negative column")
    idx = torch.arange(rows, device=sim.device)
    positive = sim[idx, offset + idx]
    hardest = sim.index_put((idx, offset + idx), sim.new_tensor(float("-inf"))).amax(dim=1)
    return F.relu(margin - positive + hardest).mean()


def distill_contrastive(student: Tensor, teacher: Tensor, temperature: float = 0.05) -> Tensor:
    """Contrastive distillation (DistilCSE, Xu et al. 2023): each student embedding must pick out the
    teacher's embedding of the same sentence among the teacher's embeddings of the batch.

    With ``c_ij = cos(s_i, t_j)`` over the B texts of a batch::

        L_CD = -(1/B) sum_i log( e^{c_ii / tau} / sum_j e^{c_ij / tau} )

    Gradients flow only into the student (the teacher's embeddings are constants). Needs the same
    dimension D for both; use :func:`distill_similarity` across dimensions.

    Args:
        student: ``(B, D)`` student embeddings.
        teacher: ``(B, D)`` teacher embeddings of the same texts.
        temperature: tau > 0.

    Raises:
        ValueError: On mismatched shapes or a non-positive temperature.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"distill_contrastive needs student and teacher of one shape (B, D), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = F.normalize(student, dim=-1) @ F.normalize(teacher.detach(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(student.shape[0], device=student.device))


def distill_similarity(student_rows: Tensor, student_cols: Tensor, teacher_rows: Tensor, teacher_cols: Tensor,
                       temperature: float = 0.05, exclude: Tensor | None = None) -> Tensor:
    """Similarity-matrix distillation: KL between the teacher's and the student's in-batch similarity
    distributions (as in CKD-style relational distillation). Works across embedding dimensions.

    With ``p^x_ij = softmax_{j not in E(i)}(cos(x_i, x_j) / tau)`` over the columns (the batch's views) that
    ``exclude`` does not leave out for row i (``E(i)``), and ``R`` the rows with at least one column left::

        L_SD = (1/|R|) sum_{i in R} sum_{j not in E(i)} p^t_ij (log p^t_ij - log p^s_ij)

    Leave out each anchor's own text (:func:`same_text_columns`): its column has cosine 1 for teacher and
    student alike, and at tau = 0.05 it takes ~96 % of the teacher's mass on SNLI batches, so with it the KL
    is ~0.008 whatever the student does; without it, ~0.12 for MiniLM against all-mpnet-base-v2.

    Args:
        student_rows: ``(B, D)`` student anchors.
        student_cols: ``(N, D)`` student columns (the batch's views).
        teacher_rows: ``(B, D')`` teacher embeddings of the anchors' texts.
        teacher_cols: ``(N, D')`` teacher embeddings of the columns' texts.
        temperature: tau > 0, for both distributions.
        exclude: ``(B, N)`` bool, True for the columns left out of row i's distributions; None: none.

    Raises:
        ValueError: On mismatched shapes or a non-positive temperature.
    """
    if (student_rows.dim() != 2 or teacher_rows.dim() != 2 or student_rows.shape[0] != teacher_rows.shape[0]
            or student_cols.shape[0] != teacher_cols.shape[0] or student_rows.shape[1] != student_cols.shape[1]
            or teacher_rows.shape[1] != teacher_cols.shape[1]):
        raise ValueError(f"distill_similarity: student {tuple(student_rows.shape)} x {tuple(student_cols.shape)} "
                         f"does not match teacher {tuple(teacher_rows.shape)} x {tuple(teacher_cols.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits_s = similarity_matrix(student_rows, student_cols) / temperature
    logits_t = similarity_matrix(teacher_rows, teacher_cols).detach() / temperature
    if exclude is not None:
        if exclude.shape != logits_s.shape:
            raise ValueError(f"distill_similarity: exclude {tuple(exclude.shape)} must be {tuple(logits_s.shape)}")
        keep = ~exclude.all(dim=1)  # a row with no column left has no distribution
        # a finite fill, not -inf: kl_div computes exp(t) * (t - s), and -inf - -inf is NaN; exp(-1e4) is 0
        logits_s = logits_s.masked_fill(exclude, -1e4)[keep]
        logits_t = logits_t.masked_fill(exclude, -1e4)[keep]
        if logits_s.shape[0] == 0:
            return logits_s.sum()  # zero, still attached to the graph
    log_s, log_t = F.log_softmax(logits_s, dim=1), F.log_softmax(logits_t, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def same_text_columns(teacher_rows: Tensor, teacher_cols: Tensor, tolerance: float = 1e-6) -> Tensor:
    """``(B, N)`` bool: True where a column is the anchor's own text, told by the teacher's embeddings.

    The teacher's vectors are cached per distinct text, so a column of the same text (the anchor itself, its
    dropout view, a repeated sentence) has exactly the anchor's vector: ``cos >= 1 - tolerance``.
    """
    return similarity_matrix(teacher_rows, teacher_cols).detach() >= 1.0 - tolerance


def supcon(embeddings: Tensor, labels: Tensor, temperature: float = 0.05) -> Tensor:
    """Supervised contrastive loss, L_out variant (SupCon, Khosla et al., NeurIPS 2020).

    With ``z`` L2-normalised, ``s_ia = z_i . z_a / tau`` and ``P(i) = {p != i : y_p = y_i}``::

        L = mean_{i : |P(i)| > 0}  -1/|P(i)| sum_{p in P(i)} log( e^{s_ip} / sum_{a != i} e^{s_ia} )

    Args:
        embeddings: ``(N, D)``.
        labels: ``(N,)`` integer class labels.
        temperature: tau > 0.

    Returns:
        Scalar mean loss over anchors with at least one positive.

    Raises:
        ValueError: On bad shapes or temperature, or when no anchor has a positive.
    """
    if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(f"need embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)}, "
                         f"{tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.normalize(embeddings, dim=-1)
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos_mask.sum(dim=1)
    if not bool((has_pos := n_pos > 0).any()):
        raise ValueError("supcon: no anchor has a positive (every label is unique)")
    # masked_fill, not multiply: the diagonal of log_prob is -inf and 0 * -inf = nan.
    per_anchor = -log_prob.masked_fill(~pos_mask, 0.0).sum(dim=1)[has_pos] / n_pos[has_pos]
    return per_anchor.mean()


def contrastive_loss(
    anchor: Tensor, positive: Tensor, negative: Tensor | None = None, *, temperature: float = 0.05,
    hard_negative_weight: float = 0.0, eh_weight: float = 0.0, eh_margin: float = 0.2, offset: int = 0,
) -> dict[str, Tensor]:
    """PromCSE objective ``L = L_CL + lambda * L_EH`` from one similarity matrix.

    See :func:`nt_xent` (SimCSE) and :func:`energy_hinge` (PromCSE) for the formulas. Published
    supervised values: tau = 0.05, m = 0.2, lambda = 10.

    Args:
        anchor: ``(B, D)``.
        positive: ``(M, D)``, ``M >= B``; anchor ``i``'s positive is row ``offset + i``.
        negative: Optional ``(kM, D)`` hard negatives (k blocks of M).
        temperature: tau for NT-Xent.
        hard_negative_weight: Logit bonus on the paired hard negative.
        eh_weight: lambda; the hinge is computed only when > 0.
        eh_margin: m.
        offset: Row of anchor 0's positive among the positives.

    Returns:
        ``{"nt_xent", ["energy_hinge" (unweighted),] "loss"}``, all scalars.

    Raises:
        ValueError: On mismatched shapes or invalid settings.
    """
    if eh_weight < 0:
        raise ValueError(f"eh_weight must be >= 0, got {eh_weight}")
    sim = similarity_matrix(anchor, positive, negative)
    m = positive.shape[0]
    terms = {"nt_xent": nt_xent(sim, temperature, hard_negative_weight, offset, num_positives=m)}
    terms["loss"] = terms["nt_xent"]
    if eh_weight > 0:
        terms["energy_hinge"] = energy_hinge(sim, eh_margin, offset, num_positives=m)
        terms["loss"] = terms["nt_xent"] + eh_weight * terms["energy_hinge"]
    return terms


def supcon_views(
    anchor: Tensor, positive: Tensor, negative: Tensor | None = None, *, labels: Tensor,
    temperature: float = 0.05,
) -> dict[str, Tensor]:
    """SupCon over two views, ``cat(anchor, positive)`` with ``labels`` repeated. Hard negatives, if any,
    join with fresh unique labels, so they only ever appear in denominators (never as positives).

    Training uses it for ``loss.name: supcon`` (labels from the training file's ``label`` column)."""
    for name, x in (("positive", positive), ("negative", negative)):
        if x is not None and x.shape != anchor.shape:
            raise ValueError(f"supcon: {name} shape {tuple(x.shape)} != anchor shape {tuple(anchor.shape)}")
    parts, all_labels = [anchor, positive], [labels, labels]
    if negative is not None:
        parts.append(negative)
        fresh = labels.max() + 1 + torch.arange(negative.shape[0], device=labels.device)
        all_labels.append(fresh.to(labels.dtype))
    value = supcon(torch.cat(parts), torch.cat(all_labels), temperature)
    return {"supcon": value, "loss": value}
