"""Tiled NT-Xent / energy hinge == the dense loss (values and gradients), without the B x M matrix."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from promcse.training.config import load_config
from promcse.objectives.losses import contrastive_loss
import promcse.objectives.objective
from promcse.training.config import build_objective
from promcse.objectives.tiled import tiled_contrastive_loss


def run(fn, anchor, positive, negative, **kwargs):
    """Loss terms and gradients w.r.t. every input."""
    leaves = [x.detach().clone().requires_grad_() for x in (anchor, positive, negative) if x is not None]
    terms = fn(*leaves, *([None] if negative is None else []), **kwargs)
    terms["loss"].backward()
    return {k: v.detach() for k, v in terms.items()}, [x.grad for x in leaves]


def assert_same(anchor, positive, negative=None, tile=4, **kwargs):
    dense, dense_grads = run(contrastive_loss, anchor, positive, negative, **kwargs)
    tiled, tiled_grads = run(tiled_contrastive_loss, anchor, positive, negative, tile_size=tile, **kwargs)
    assert dense.keys() == tiled.keys()
    for k in dense:
        torch.testing.assert_close(tiled[k], dense[k], rtol=1e-5, atol=1e-5)
    for got, want in zip(tiled_grads, dense_grads):
        assert float((got - want).norm() / want.norm().clamp(min=1e-12)) < 1e-4
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows, tile", [(13, 4), (16, 16), (9, 100), (7, 1)])
def test_unsupervised_matches_dense(rows: int, tile: int) -> None:
    g = torch.Generator().manual_seed(rows)
    assert_same(torch.randn(rows, 8, generator=g), torch.randn(rows, 8, generator=g), tile=tile)


@pytest.mark.parametrize("weight", [0.0, 0.7])
@pytest.mark.parametrize("eh_weight", [0.0, 10.0])
def test_hard_negatives_bonus_and_hinge_match_dense(weight: float, eh_weight: float) -> None:
    g = torch.Generator().manual_seed(1)
    a, p, n = (torch.randn(11, 16, generator=g) for _ in range(3))
    assert_same(a, p, n, tile=3, hard_negative_weight=weight, eh_weight=eh_weight, eh_margin=0.4)


@pytest.mark.parametrize("tile", [2, 5, 64])
def test_offset_with_more_positives_than_anchors(tile: int) -> None:
    """The distributed layout: 5 local anchors against 15 gathered columns, positives at 5..9."""
    g = torch.Generator().manual_seed(2)
    a, p, n = torch.randn(5, 8, generator=g), torch.randn(15, 8, generator=g), torch.randn(15, 8, generator=g)
    assert_same(a, p, n, tile=tile, offset=5, hard_negative_weight=0.3, eh_weight=10.0, eh_margin=0.3)
    assert_same(a, p, None, tile=tile, offset=10, eh_weight=2.0, eh_margin=1.5)


def exact_unit_vectors(rows: int, seed: int) -> torch.Tensor:
    """Rows with four entries of +-0.5 in 8 dims: unit norm, dot products exact multiples of 1/4."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(rows, 8)
    for i in range(rows):
        idx = torch.randperm(8, generator=g)[:4]
        out[i, idx] = 0.5 * torch.sign(torch.randn(4, generator=g))
    return out


def test_ties_in_the_hinge_share_the_gradient_like_amax() -> None:
    """Exactly tied hardest negatives (duplicated columns, coarse cosines), tiles splitting the ties."""
    a = exact_unit_vectors(10, 3)
    p = exact_unit_vectors(10, 4)
    p[5] = p[2]  # duplicated positive: a tie for every anchor whose hardest negative it is
    n = torch.cat([p[3:4].repeat(4, 1), exact_unit_vectors(6, 5)])
    for tile in (1, 3, 4, 7):
        assert_same(a, p, n, tile=tile, eh_weight=10.0, eh_margin=2.0)  # margin 2: every row active


def test_extreme_logits_stay_finite() -> None:
    """tau = 0.005 on near-parallel vectors: logits near 200 (e^200 overflows fp32), softmax not saturated."""
    g = torch.Generator().manual_seed(6)
    u = torch.randn(1, 8, generator=g)
    a, p, n = (u + 0.03 * torch.randn(6, 8, generator=g) for _ in range(3))
    assert_same(a, p, n, tile=4, temperature=0.005)


def test_rejects_what_dense_rejects() -> None:
    a = torch.randn(4, 8)
    with pytest.raises(ValueError):
        tiled_contrastive_loss(a, a, hard_negative_weight=1.0)
    with pytest.raises(ValueError):
        tiled_contrastive_loss(a, torch.randn(4, 7))
    with pytest.raises(ValueError):
        tiled_contrastive_loss(a, a, offset=1)
    with pytest.raises(ValueError):
        tiled_contrastive_loss(a, a, tile_size=0)


class MaxTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_similarity_matrix_is_never_formed() -> None:
    rows, dim, tile = 96, 4, 8
    a, p, n = (torch.randn(rows, dim, requires_grad=True) for _ in range(3))
    with MaxTensor() as probe:
        tiled_contrastive_loss(a, p, n, eh_weight=10.0, tile_size=tile)["loss"].backward()
    assert probe.largest <= max(tile * tile, 2 * rows * dim)  # tiles, or the (2B, D) columns
    assert probe.largest < rows * 2 * rows


@pytest.mark.parametrize("name", sorted(promcse.objectives.objective.CONTRASTIVE - {"supcon"}))  # supcon is dense only
def test_config_key_selects_the_tiled_loss(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(12, 8, generator=g) for _ in range(3)]
    dense = build_objective(load_config(None, [f"loss.name={name}"]).loss)(views)
    calls: list[int] = []

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(int(kwargs["tile_size"]))  # type: ignore[arg-type]
        return tiled_contrastive_loss(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(promcse.objectives.objective, "tiled_contrastive_loss", spy)
    tiled = build_objective(load_config(None, [f"loss.name={name}", "loss.tile_size=5"]).loss)(views)
    assert calls == [5] and set(tiled) == set(dense)
    for k in dense:
        torch.testing.assert_close(tiled[k], dense[k], rtol=1e-5, atol=1e-5)
