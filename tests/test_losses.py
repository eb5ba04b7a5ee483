"""Losses against naive Python-loop references (values and float64 autograd gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from promcse.training.config import LossConfig
from promcse.objectives.losses import (
    contrastive_loss,
    energy_hinge,
    nt_xent,
    similarity_matrix,
    supcon,
    supcon_views,
)
from promcse.objectives.objective import OBJECTIVES
from promcse.training.config import build_objective

D = 5


# ---------------------------------------------------------------- loop references (no matmul, no
# normalize, no cross_entropy / logsumexp / amax: every number is built from scalar operations)


def _cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    dot = sum(u[k] * v[k] for k in range(len(u)))
    nu = torch.sqrt(sum(u[k] * u[k] for k in range(len(u))))
    nv = torch.sqrt(sum(v[k] * v[k] for k in range(len(v))))
    return dot / (nu * nv)


def _ref_nt_xent(a, p, n, tau, w, offset):
    total = 0.0
    for i in range(len(a)):
        pos_logit = _cos(a[i], p[offset + i]) / tau
        denom = 0.0
        for j in range(len(p)):
            denom = denom + torch.exp(_cos(a[i], p[j]) / tau)
        if n is not None:
            for j in range(len(n)):
                bonus = w if j == offset + i else 0.0
                denom = denom + torch.exp(_cos(a[i], n[j]) / tau + bonus)
        total = total - torch.log(torch.exp(pos_logit) / denom)
    return total / len(a)


def _ref_energy_hinge(a, p, n, margin, offset):
    total = 0.0
    for i in range(len(a)):
        cands = [_cos(a[i], p[j]) for j in range(len(p)) if j != offset + i]
        if n is not None:
            cands += [_cos(a[i], n[j]) for j in range(len(n))]
        best = cands[0]
        for c in cands[1:]:
            if c.item() > best.item():
                best = c
        # exact ties share the (sub)gradient equally
        tied = [c for c in cands if c.item() == best.item()]
        hardest = sum(tied) / len(tied)
        val = margin - _cos(a[i], p[offset + i]) + hardest
        total = total + (val if val.item() > 0 else 0.0 * val)
    return total / len(a)


def _ref_supcon(z, labels, tau):
    n = len(z)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = 0.0
        for a in range(n):
            if a != i:
                denom = denom + torch.exp(_cos(z[i], z[a]) / tau)
        s = 0.0
        for p in positives:
            s = s + torch.log(torch.exp(_cos(z[i], z[p]) / tau) / denom)
        per_anchor.append(-s / len(positives))
    return sum(per_anchor) / len(per_anchor)


# ---------------------------------------------------------------- helpers


def _inputs(b, m, with_neg, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda r: torch.randn(r, D, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    return mk(b), mk(m), (mk(m) if with_neg else None)


def _grads(value, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(value, tensors)


def _assert_close_with_grads(fast, ref, tensors):
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for gf, gr in zip(_grads(fast, tensors), _grads(ref, tensors)):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)


CASES = [  # (B, M, hard negatives, hard_negative_weight, offset)
    (4, 4, False, 0.0, 0),
    (4, 4, True, 0.0, 0),
    (4, 4, True, 1.5, 0),
    (3, 7, True, -0.7, 2),
    (3, 7, False, 0.0, 4),
]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("with_neg", [False, True])
def test_similarity_matrix_layout(with_neg):
    a, p, n = _inputs(3, 5, with_neg)
    sim = similarity_matrix(a, p, n)
    cols = list(p) + (list(n) if with_neg else [])
    assert sim.shape == (3, len(cols))
    for i in range(3):
        for j, c in enumerate(cols):
            assert math.isclose(sim[i, j].item(), _cos(a[i], c).item(), rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("b,m,with_neg,w,offset", CASES)
def test_nt_xent_matches_loop_reference(b, m, with_neg, w, offset):
    a, p, n = _inputs(b, m, with_neg, seed=b + m + offset)
    tau = 0.05 if w == 0 else 0.3
    fast = nt_xent(similarity_matrix(a, p, n), tau, w, offset, num_positives=m)
    ref = _ref_nt_xent(a, p, n, tau, w, offset)
    _assert_close_with_grads(fast, ref, [a, p, n])


def test_hard_negative_weight_changes_loss():
    a, p, n = _inputs(4, 4, True)
    sim = similarity_matrix(a, p, n)
    assert nt_xent(sim, 0.1, 2.0).item() > nt_xent(sim, 0.1, 0.0).item()


@pytest.mark.parametrize("b,m,with_neg,_w,offset", CASES)
@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_energy_hinge_matches_loop_reference(b, m, with_neg, _w, offset, margin):
    a, p, n = _inputs(b, m, with_neg, seed=10 + b + m + offset)
    fast = energy_hinge(similarity_matrix(a, p, n), margin, offset, num_positives=m)
    ref = _ref_energy_hinge(a, p, n, margin, offset)
    assert ref.item() > 0  # the hinge is active somewhere, so gradients are non-trivial
    _assert_close_with_grads(fast, ref, [a, p, n])


def test_energy_hinge_ties_from_duplicate_rows():
    a, p, n = _inputs(4, 4, True, seed=3)
    with torch.no_grad():
        p[2] = p[1]  # duplicate positives: anchor 0's hardest negative is a two-way tie
        a[0] = p[1] + 0.01
    fast = energy_hinge(similarity_matrix(a, p, n), 0.2)
    ref = _ref_energy_hinge(a, p, n, 0.2, 0)
    c01, c02 = _cos(a[0], p[1]), _cos(a[0], p[2])
    assert c01.item() == c02.item() and c01.item() > 0.99  # the tie is real and decisive
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    (ga_f, gp_f, gn_f), (ga_r, gp_r, gn_r) = _grads(fast, [a, p, n]), _grads(ref, [a, p, n])
    torch.testing.assert_close(ga_f, ga_r)
    torch.testing.assert_close(gn_f, gn_r)
    # any split of the tied subgradient is valid: compare the untied rows and the tied pair's sum
    torch.testing.assert_close(gp_f[[0, 3]], gp_r[[0, 3]])
    torch.testing.assert_close(gp_f[1] + gp_f[2], gp_r[1] + gp_r[2])


def test_energy_hinge_inactive_margin_gives_zero_loss_and_grads():
    eye = torch.eye(8, dtype=torch.float64)
    a = eye[:3].clone().requires_grad_(True)
    p = (eye[:3] + 0.01 * eye[3:6]).requires_grad_(True)  # cos(a_i, p_i) ~ 1
    n = eye[5:8].clone().requires_grad_(True)  # nearly orthogonal to every anchor
    loss = energy_hinge(similarity_matrix(a, p, n), margin=0.2)
    assert loss.item() == 0.0
    assert _ref_energy_hinge(a, p, n, 0.2, 0).item() == 0.0
    for g in _grads(loss, [a, p, n]):
        assert torch.count_nonzero(g) == 0
    assert energy_hinge(similarity_matrix(a, p, n), margin=1.5).item() > 0  # and it can switch on


def test_supcon_matches_loop_reference():
    z = _inputs(7, 1, False, seed=5)[0]
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # labels 2 and 3 are anchors without positives
    fast = supcon(z, labels, temperature=0.1)
    _assert_close_with_grads(fast, _ref_supcon(z, labels.tolist(), 0.1), [z])
    assert torch.isfinite(_grads(supcon(z, labels, 0.05), [z])[0]).all()


def test_supcon_without_any_positive_raises():
    with pytest.raises(ValueError, match="positive"):
        supcon(torch.randn(3, D), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("with_neg", [False, True])
def test_contrastive_loss_terms(with_neg):
    a, p, n = _inputs(3, 5, with_neg, seed=7)
    kw = dict(temperature=0.1, offset=1, hard_negative_weight=0.5 if with_neg else 0.0)
    plain = contrastive_loss(a, p, n, **kw)
    assert set(plain) == {"nt_xent", "loss"}
    terms = contrastive_loss(a, p, n, eh_weight=10.0, eh_margin=0.3, **kw)
    assert set(terms) == {"nt_xent", "energy_hinge", "loss"}
    nt = _ref_nt_xent(a, p, n, 0.1, kw["hard_negative_weight"], 1)
    eh = _ref_energy_hinge(a, p, n, 0.3, 1)
    _assert_close_with_grads(terms["loss"], nt + 10.0 * eh, [a, p, n])
    torch.testing.assert_close(terms["energy_hinge"], eh)
    torch.testing.assert_close(plain["loss"], nt)


def test_supcon_entry_two_views_and_negatives():
    a, p, n = _inputs(3, 3, True, seed=8)
    labels = torch.tensor([4, 7, 4])
    out = supcon_views(a, p, n, labels=labels, temperature=0.2)
    ref = _ref_supcon(list(a) + list(p) + list(n), [4, 7, 4, 4, 7, 4, 8, 9, 10], 0.2)
    _assert_close_with_grads(out["loss"], ref, [a, p, n])
    torch.testing.assert_close(out["supcon"], out["loss"])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("with_neg", [False, True])
@pytest.mark.parametrize("tile_size", [0, 3])
def test_registry_contract(name, with_neg, tile_size):
    """Every registry entry, through the one composing call the training step makes."""
    kind = OBJECTIVES[name]
    a, p, n = _inputs(4, 4, with_neg, seed=9)
    objective = build_objective(LossConfig(name=name, tile_size=tile_size if kind.tiles else 0,
                                           distill_teacher="" if kind.terms else "teacher"))
    labels = torch.tensor([0, 1, 0, 2]) if objective.needs_labels else None  # supcon takes the rows' classes
    views = [a, p, n] if with_neg else [a, p]
    teacher = None if kind.terms else [v.detach().flip(0) for v in views]  # distill alone needs a teacher
    out = objective.compose(views, labels=labels, local=views, teacher=teacher)
    assert isinstance(out, dict) and "loss" in out
    assert ("energy_hinge" in out) == kind.eh
    assert objective.needs_hard_negatives == kind.eh
    assert objective.contrastive == (kind.terms is not None)
    for value in out.values():
        assert value.dim() == 0 and torch.isfinite(value)
    for g in _grads(out["loss"], views):
        assert torch.isfinite(g).all() and torch.count_nonzero(g) > 0


def test_compose_weights_and_sums_every_term():
    """loss = L_contrastive + mu * L_D, computed in one place (Objective.compose), against the parts."""
    a, p, n = _inputs(4, 4, True, seed=3)
    teacher = [v.detach().roll(1, 0) for v in (a, p, n)]
    objective = build_objective(LossConfig(name="nt_xent_eh", distill_teacher="t", distill_weight=0.7))
    out = objective.compose([a, p, n], local=[a, p, n], teacher=teacher)
    expected = objective([a, p, n])["loss"] + 0.7 * objective.distill_terms([a, p, n], teacher)
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) >= {"loss", "distill", "energy_hinge"}
    no_contrastive = objective.compose(None, local=[a, p, n], teacher=teacher)  # a distillation-only source
    torch.testing.assert_close(no_contrastive["loss"], 0.7 * out["distill"])
    with pytest.raises(ValueError, match="no contrastive term"):
        build_objective(LossConfig(name="distill", distill_teacher="t"))([a, p])


def test_objective_terms_follow_the_config():
    a, p, n = _inputs(5, 5, True, seed=3)
    plain = build_objective(LossConfig(name="nt_xent", eh_weight=10.0))([a, p, n])  # lambda ignored without EH
    torch.testing.assert_close(plain["loss"], _ref_nt_xent(a, p, n, 0.05, 0.0, 0))
    weighted = build_objective(LossConfig(name="nt_xent", hard_negative_weight=1.5))
    assert weighted.needs_hard_negatives
    torch.testing.assert_close(weighted([a, p, n])["loss"], _ref_nt_xent(a, p, n, 0.05, 1.5, 0))
    eh = build_objective(LossConfig(name="nt_xent_eh", eh_weight=4.0, eh_margin=0.3))([a, p, n])
    torch.testing.assert_close(eh["loss"], _ref_nt_xent(a, p, n, 0.05, 0.0, 0) + 4.0 * _ref_energy_hinge(a, p, n, 0.3, 0))


@pytest.mark.parametrize(
    "call",
    [
        lambda: similarity_matrix(torch.randn(4), torch.randn(4, D)),
        lambda: similarity_matrix(torch.randn(4, D), torch.randn(4, D + 1)),
        lambda: similarity_matrix(torch.randn(4, D), torch.randn(3, D)),
        lambda: similarity_matrix(torch.randn(4, D), torch.randn(4, D), torch.randn(5, D)),
        lambda: nt_xent(torch.randn(3, 5)),
        lambda: nt_xent(torch.randn(3, 6), num_positives=4),
        lambda: nt_xent(torch.randn(3, 5), offset=3, num_positives=5),
        lambda: nt_xent(torch.randn(3, 3), hard_negative_weight=1.0),
        lambda: nt_xent(torch.randn(3, 3), temperature=0.0),
        lambda: energy_hinge(torch.randn(3, 4), offset=-1, num_positives=4),
        lambda: energy_hinge(torch.randn(1, 1)),
        lambda: supcon(torch.randn(4, D), torch.tensor([0, 0, 1])),
        lambda: contrastive_loss(torch.randn(4, D), torch.randn(4, D), eh_weight=-1.0),
        lambda: contrastive_loss(torch.randn(4, D), torch.randn(6, D), offset=3),
        lambda: supcon_views(torch.randn(4, D), torch.randn(5, D), labels=torch.zeros(4).long()),
        lambda: supcon_views(torch.randn(4, D), torch.randn(4, D), labels=torch.zeros(3).long()),
    ],
)
def test_bad_shapes_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- several hard negatives per row


def _ref_multi(a, p, negs, tau, w, margin, offset):
    """Loop references for k negative columns per row: every negative of every row is a candidate;
    the bonus w goes to row i's own k negatives (row offset + i of each block)."""
    nt, eh = 0.0, 0.0
    for i in range(len(a)):
        own = offset + i
        denom = sum(torch.exp(_cos(a[i], p[j]) / tau) for j in range(len(p)))
        cands = [_cos(a[i], p[j]) for j in range(len(p)) if j != own]
        for n in negs:
            for j in range(len(n)):
                denom = denom + torch.exp(_cos(a[i], n[j]) / tau + (w if j == own else 0.0))
                cands.append(_cos(a[i], n[j]))
        nt = nt - torch.log(torch.exp(_cos(a[i], p[own]) / tau) / denom)
        best = cands[0]
        for c in cands[1:]:
            if c.item() > best.item():
                best = c
        eh = eh + torch.clamp(margin - _cos(a[i], p[own]) + best, min=0.0)
    return nt / len(a), eh / len(a)


@pytest.mark.parametrize("b,m,k,w,offset", [(4, 4, 2, 0.0, 0), (4, 4, 3, 1.5, 0), (3, 6, 2, -0.5, 2)])
@pytest.mark.parametrize("tile_size", [0, 2])
def test_several_hard_negatives_match_loop_reference(b, m, k, w, offset, tile_size):
    g = torch.Generator().manual_seed(b * 10 + k)
    mk = lambda r: torch.randn(r, D, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    a, p, negs = mk(b), mk(m), [mk(m) for _ in range(k)]
    objective = build_objective(LossConfig(name="nt_xent_eh", eh_weight=3.0, eh_margin=0.5, temperature=0.3,
                                           hard_negative_weight=w, tile_size=tile_size))
    out = objective([a, p, *negs], offset)
    ref_nt, ref_eh = _ref_multi(a, p, negs, 0.3, w, 0.5, offset)
    assert ref_eh.item() > 0  # the hinge is active, so its gradient is checked too
    ref = ref_nt + 3.0 * ref_eh
    if tile_size == 0:
        torch.testing.assert_close(out["nt_xent"], ref_nt, rtol=1e-10, atol=1e-12)
        _assert_close_with_grads(out["loss"], ref, [a, p, *negs])
        return
    # The tiled form accumulates in fp32: compare values and gradients at fp32 precision.
    torch.testing.assert_close(out["nt_xent"].double(), ref_nt, rtol=1e-5, atol=1e-6)
    for gf, gr in zip(_grads(out["loss"], [a, p, *negs]), _grads(ref, [a, p, *negs])):
        torch.testing.assert_close(gf.double(), gr, rtol=1e-4, atol=1e-5)


def test_negative_blocks_must_match_the_positives():
    with pytest.raises(ValueError, match="k blocks"):
        similarity_matrix(torch.randn(4, D), torch.randn(4, D), torch.randn(6, D))
    sim = similarity_matrix(torch.randn(2, D), torch.randn(2, D), torch.randn(6, D))
    assert sim.shape == (2, 8)
