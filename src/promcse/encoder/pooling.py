"""Poolers: from encoder hidden states to one vector per sentence, over real tokens only.

The prefix never appears here: :func:`promcse.encoder.prompt.run_encoder` returns hidden states of the real
tokens only, and every pooler takes the tokens' own attention mask.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from promcse.encoder.backbone import reference_init_


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, T, H) over positions where ``mask`` (B, T) is 1."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def pool_cls(hidden_states: tuple[Tensor, ...], mask: Tensor) -> Tensor:
    """[CLS] (first token) of the last layer."""
    return hidden_states[-1][:, 0]


def pool_avg(hidden_states: tuple[Tensor, ...], mask: Tensor) -> Tensor:
    """Mask-aware mean of the last layer."""
    return masked_mean(hidden_states[-1], mask)


def pool_avg_first_last(hidden_states: tuple[Tensor, ...], mask: Tensor) -> Tensor:
    """Mean of the first transformer layer's and the last layer's outputs (not the embeddings)."""
    return (masked_mean(hidden_states[1], mask) + masked_mean(hidden_states[-1], mask)) / 2.0


def pool_avg_top2(hidden_states: tuple[Tensor, ...], mask: Tensor) -> Tensor:
    """Mean of the last two layers' outputs."""
    return (masked_mean(hidden_states[-2], mask) + masked_mean(hidden_states[-1], mask)) / 2.0


PoolFn = Callable[[tuple[Tensor, ...], Tensor], Tensor]

# name -> (function, needs all hidden states). `cls` and `cls_before_pooler` pool the same token; they
# differ in the MLP head (SimCSE naming): `cls` is followed by the head, `cls_before_pooler` is not.
POOLERS: dict[str, tuple[PoolFn, bool]] = {
    "cls": (pool_cls, False),
    "cls_before_pooler": (pool_cls, False),
    "avg": (pool_avg, False),
    "avg_first_last": (pool_avg_first_last, True),
    "avg_top2": (pool_avg_top2, True),
}

# Head modes: when the MLP (Linear(H, H) + Tanh) is applied.
HEAD_MODES: tuple[str, ...] = ("none", "train_only", "always")


class MLPHead(nn.Module):
    """SimCSE's MLP over the pooled vector: ``tanh(W x + b)``, W of shape (H, H)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()
        reference_init_(self)  # N(0, 0.02) weights, zero bias, as the reference's cl_init

    def forward(self, features: Tensor) -> Tensor:
        """Apply the head."""
        return self.activation(self.dense(features))
