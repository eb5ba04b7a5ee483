"""GradCache gradients == full-batch gradients (relative 1e-4), with dropout replayed per chunk.

Two definitions of "the full-batch step" (see promcse.training.gradcache):
* dropout on: plain back-propagation through the same chunked forwards from the same random state
  (dropout masks depend on tensor shapes, so this is the only step with the same masks);
* dropout off: the true single-forward plain ``train_step``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_sentences
from promcse.encoder.backbone import load_backbone
from promcse.training.config import RunConfig, load_config
from promcse.io.data import TrainExamples
from promcse.training.gradcache import chunked_reference_step, forward_chunks, grad_cache_step, length_chunks
from promcse.encoder.model import SentenceEncoder, build_encoder
from promcse.io.data import batch_views
from promcse.training.distributed import context, shard_rows
from promcse.training.config import build_objective
from promcse.training.step import train_step
from promcse.training.train import encoder_spec

ROWS = 10


def run_step(encoder: SentenceEncoder, config: RunConfig, ex: TrainExamples, rows: np.ndarray, opt: torch.optim.Optimizer,
             sched: object) -> dict[str, float]:
    """One :func:`promcse.training.step.train_step` on this process's shard of ``rows``, as the loop takes it."""
    dist = context()
    return train_step(encoder, build_objective(config.loss), batch_views(ex, shard_rows(rows, dist)), opt, sched,
                      config.train, config.data.max_length, dist)


def make_encoder(tiny_bert: Path, config: RunConfig, dropout: bool = True) -> SentenceEncoder:
    backbone, tokenizer = load_backbone(str(tiny_bert))
    torch.manual_seed(0)
    encoder = build_encoder(encoder_spec(config.model, backbone), backbone, tokenizer)
    if not dropout:
        for module in encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return encoder.train()


def examples(supervised: bool) -> TrainExamples:
    s = make_sentences(3 * ROWS, seed=7)
    if supervised:
        return TrainExamples(s[:ROWS], s[ROWS:2 * ROWS], (s[2 * ROWS:],), "test")
    return TrainExamples(s[:ROWS], None, (), "test")


def settings(tiny_bert: Path, supervised: bool, *extra: str) -> RunConfig:
    sup = ["loss.name=nt_xent_eh", "loss.hard_negative_weight=0.5", "loss.eh_margin=0.5"] if supervised else []
    return load_config(None, [f"model.backbone={tiny_bert}", "model.prompt_length=3", "model.head=train_only",
                              "train.grad_clip=0", *sup, *extra])


def flat_grads(encoder: SentenceEncoder) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in encoder.trainable_parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def step_grads(encoder: SentenceEncoder, config: RunConfig, ex: TrainExamples, chunk: int, grad_cache: bool):
    """Loss and gradients of one step over all rows, GradCache or the chunked reference, seed 123."""
    views = batch_views(ex, np.arange(ROWS))
    inputs = encoder.tokenize([t for v in views for t in v], config.data.max_length)
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    fn = grad_cache_step if grad_cache else chunked_reference_step
    terms = fn(encoder, length_chunks(inputs, max_rows=chunk), lambda e: build_objective(config.loss)(e), ROWS)
    return terms, flat_grads(encoder)


@pytest.mark.parametrize("supervised, mode, chunk", [(False, "prompt", 3), (True, "prompt", 7), (True, "full", 8)])
def test_grad_cache_equals_reference_with_dropout(tiny_bert: Path, supervised: bool, mode: str, chunk: int) -> None:
    extra = ["model.mode=full", "model.prompt_length=0"] if mode == "full" else ["model.prompt_projection=true"]
    config = settings(tiny_bert, supervised, *extra)
    encoder = make_encoder(tiny_bert, config)
    ex = examples(supervised)
    ref_terms, ref = step_grads(encoder, config, ex, chunk, grad_cache=False)
    gc_terms, got = step_grads(encoder, config, ex, chunk, grad_cache=True)
    assert rel_err(got, ref) < 1e-4
    for k in ref_terms:
        torch.testing.assert_close(gc_terms[k], ref_terms[k], rtol=1e-5, atol=1e-6)


def test_replay_is_what_makes_it_equal(tiny_bert: Path) -> None:
    """Control: dropout really is on, and without replaying the random state the gradients differ."""
    config = settings(tiny_bert, False)
    encoder = make_encoder(tiny_bert, config)
    inputs = encoder.tokenize(["a man is playing a guitar"] * 2)
    assert not torch.allclose(encoder(inputs)[0], encoder(inputs)[1])
    _, ref = step_grads(encoder, config, examples(False), 4, grad_cache=False)
    import promcse.training.gradcache as gc

    original = gc.RngState.replay
    try:
        # no replay: the second pass draws fresh masks from wherever the generator stands
        gc.RngState.replay = lambda self: torch.random.fork_rng(devices=[])  # type: ignore[method-assign]
        _, got = step_grads(encoder, config, examples(False), 4, grad_cache=True)
    finally:
        gc.RngState.replay = original  # type: ignore[method-assign]
    assert rel_err(got, ref) > 1e-3


def plain_vs_grad_cache(tiny_bert: Path, supervised: bool, *extra: str) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    results = []
    for chunk in (0, 4):
        config = settings(tiny_bert, supervised, f"train.grad_cache_chunk={chunk}", *extra)
        encoder = make_encoder(tiny_bert, config, dropout=False)
        opt = torch.optim.SGD(encoder.trainable_parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        terms = run_step(encoder, config, examples(supervised), np.arange(ROWS), opt, sched)
        results.append((terms, flat_grads(encoder)))
    return results[0][0], results[1][0], results[0][1], results[1][1]


@pytest.mark.parametrize("supervised, extra", [(False, ()), (True, ()), (True, ("loss.tile_size=6",)),
                                               (True, ("model.mode=full", "model.prompt_length=0"))])
def test_train_step_grad_cache_equals_single_forward_without_dropout(tiny_bert: Path, supervised: bool, extra: tuple) -> None:
    plain, cached, g_plain, g_cached = plain_vs_grad_cache(tiny_bert, supervised, *extra)
    assert rel_err(g_cached, g_plain) < 1e-4
    assert plain.keys() == cached.keys()
    for k in plain:
        assert abs(plain[k] - cached[k]) <= 1e-5 * max(1.0, abs(plain[k]))


def test_length_chunks_cover_rows_once_and_trim_padding(tiny_bert: Path) -> None:
    encoder = make_encoder(tiny_bert, settings(tiny_bert, False))
    texts = make_sentences(9, seed=3) + ["two", "the dog is running in the park near the water with a ball"]
    inputs = encoder.tokenize(texts)
    lengths = inputs["attention_mask"].sum(1)
    for kwargs, expect in (({"max_rows": 4}, None), ({}, None), ({"overhead_tokens": 0}, len(set(lengths.tolist()))),
                           ({"overhead_tokens": 10**6}, 1)):
        chunks = length_chunks(inputs, **kwargs)
        assert sorted(torch.cat([c.rows for c in chunks]).tolist()) == list(range(len(texts)))
        assert expect is None or len(chunks) == expect
        for c in chunks:
            assert c.inputs["input_ids"].shape[1] == int(lengths[c.rows].max())
            assert torch.equal(c.inputs["input_ids"], inputs["input_ids"][c.rows][:, : c.inputs["input_ids"].shape[1]])
            assert len(c.rows) <= kwargs.get("max_rows", len(texts))
    with pytest.raises(ValueError):
        length_chunks(inputs, max_rows=-1)


def test_grouped_forward_equals_one_padded_forward(tiny_bert: Path) -> None:
    encoder = make_encoder(tiny_bert, settings(tiny_bert, False)).eval()
    inputs = encoder.tokenize(make_sentences(12, seed=4))
    with torch.no_grad():
        whole = encoder(inputs)
        grouped = forward_chunks(encoder, length_chunks(inputs, overhead_tokens=0))
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_step_runs_with_an_fp32_loss(tiny_bert: Path) -> None:
    """``train.precision=bf16``: encoder passes autocast, loss in fp32; close to the fp32 step."""
    losses = []
    for precision in ("fp32", "bf16"):
        config = settings(tiny_bert, True, "train.grad_cache_chunk=8", f"train.precision={precision}")
        encoder = make_encoder(tiny_bert, config, dropout=False)
        opt = torch.optim.SGD(encoder.trainable_parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        losses.append(run_step(encoder, config, examples(True), np.arange(ROWS), opt, sched)["loss"])
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in encoder.trainable_parameters())
    assert abs(losses[1] - losses[0]) < 0.05 * abs(losses[0])
