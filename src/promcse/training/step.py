"""One optimizer step of contrastive training, on every process alike.

Tokenize every view of the (local shard of the) batch together, forward in length-sorted groups, split
into anchor / positive / hard-negative embeddings, the objective's terms (:mod:`promcse.objectives.objective`) against
the views of every process (:mod:`promcse.training.distributed`), backward, one gradient all-reduce, clip, AdamW,
schedule. With ``train.grad_cache_chunk > 0`` the same loss and gradients come from GradCache
(:mod:`promcse.training.gradcache`) in the memory of one chunk.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from promcse.training.config import TrainConfig
from promcse.training.distributed import DistContext, all_reduce_gradients, gather_columns
from promcse.training.gradcache import LossFn, forward_chunks, grad_cache_step, length_chunks
from promcse.encoder.model import SentenceEncoder
from promcse.objectives.objective import Objective


def embed_views(encoder: SentenceEncoder, views: list[list[str]], max_length: int) -> list[torch.Tensor]:
    """Embed all views: one tokenization, forwards grouped by length (each row its own dropout masks).

    Rows are sorted by token count and forwarded in a few groups, each padded only to its own
    longest row (:func:`promcse.training.gradcache.length_chunks`): same embeddings, far fewer padded tokens.
    """
    flat = [text for view in views for text in view]
    embeddings = forward_chunks(encoder, length_chunks(encoder.tokenize(flat, max_length)))
    return list(embeddings.split(len(views[0])))


def global_loss(objective: Objective, dist: DistContext, teacher: list[torch.Tensor] | None = None,
                contrastive: bool = True, labels: torch.Tensor | None = None) -> LossFn:
    """The step's loss on view embeddings, in fp32 even under autocast.

    The contrastive terms (when ``objective.contrastive`` and the batch's source asks for them) are taken
    against every process's columns; the distillation term (given the ``teacher``'s embeddings of the
    views' texts) on this process's rows; :meth:`promcse.objectives.objective.Objective.compose` weights and
    sums them. ``labels``: the rows' class ids
    (``supcon``).
    """

    def loss_fn(embedded: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(embedded[0].device.type, enabled=False):
            local = [e.float() for e in embedded]
            gathered, offset, rows = None, 0, None
            if objective.contrastive and contrastive:
                anchor, positive, negative, offset = gather_columns(local, dist)
                gathered = [anchor, positive] + ([negative] if negative is not None else [])
                rows = None if labels is None else labels.to(anchor.device)
            on_device = None if teacher is None else [t.to(local[0].device) for t in teacher]
            return objective.compose(gathered, offset, rows, local, on_device)

    return loss_fn


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """SDPA backends for training steps: on CUDA, everything but cuDNN.

    Profiled on an H200 (benchmarks/gpu_profile_step.py, BERT-base, batch 256, bf16): PyTorch picks
    cuDNN attention for bf16 with our additive prefix mask, and cuDNN spends ~4 ms CPU per forward and
    ~6 ms per backward call building its graph for every new sequence length, which made bf16 steps 3x
    slower than TF32. The memory-efficient kernel takes the same mask without that cost.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def train_step(encoder: SentenceEncoder, objective: Objective, views: list[list[str]], optimizer: torch.optim.Optimizer,
               scheduler: Any, train: TrainConfig, max_length: int, dist: DistContext,
               teacher: list[torch.Tensor] | None = None, contrastive: bool = True,
               labels: torch.Tensor | None = None) -> dict[str, float]:
    """One optimizer step on this process's ``views`` (its shard of the global batch).

    Returns the global loss terms (averaged over processes) as floats. ``train.precision == "bf16"``
    autocasts the encoder passes; the loss is computed in fp32. ``teacher``: the teacher's embeddings of
    the views' texts (distillation); ``contrastive``: whether the batch's source takes the contrastive term;
    ``labels``: the rows' class ids (``supcon``).
    """
    loss_fn = global_loss(objective, dist, teacher, contrastive, labels)
    params = encoder.trainable_parameters()
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(encoder.device.type, torch.bfloat16, enabled=train.precision == "bf16")
    with autocast, attention_kernels(encoder.device):
        if train.grad_cache_chunk > 0:
            inputs = encoder.tokenize([text for view in views for text in view], max_length)
            chunks = length_chunks(inputs, max_rows=train.grad_cache_chunk)
            terms = grad_cache_step(encoder, chunks, loss_fn, len(views[0]))
        else:
            terms = loss_fn(embed_views(encoder, views, max_length))
            terms["loss"].backward()
    terms = all_reduce_gradients(params, terms, dist)
    if train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
    optimizer.step()
    scheduler.step()
    return {k: float(v.detach()) for k, v in terms.items()}
