"""Query-side adaptation: train only what encodes queries, against the fixed vectors of the corpus.

The documents stay encoded by the frozen backbone, exactly as they are in the user's index, so the index stays
valid and adaptation never re-embeds the corpus. Because the document vectors are fixed, each query is scored
against the *whole* corpus every step (:func:`promcse.objectives.corpus_losses.corpus_nt_xent`): the corpus is
the bank of negatives, every hard negative a miner would find is in it, and every judged-relevant document is
kept out of a query's negatives. Only short queries pass through the model, so an epoch over SciFact's ~800
training queries takes seconds on a CPU.

Three things can be trained on the query side (``QueryTuneConfig.mode``): a deep prompt (``prompt``; the
product, saved as a role pair whose document role is the frozen backbone), LoRA adapters from PEFT (``lora``)
or the whole backbone (``full``); the last two are for comparisons at equal data. Model selection is by a
pluggable dev scorer (retrieval nDCG@10 on a dev split, :func:`retrieval_dev_scorer`), checked every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from promcse.encoder.backbone import load_backbone, shape_of
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.encoder.prompt import PromptSpec
from promcse.errors import PromcseError
from promcse.evaluation.beir import BeirData
from promcse.evaluation.retrieval import CorpusVectors, score_vectors
from promcse.objectives.corpus_losses import corpus_hinge, corpus_nt_xent, query_corpus_similarity

MODES: tuple[str, ...] = ("prompt", "lora", "full")
DEFAULT_LR: dict[str, float] = {"prompt": 1e-2, "lora": 1e-3, "full": 2e-5}
Scorer = Callable[[SentenceEncoder], float]


@dataclass
class QueryTuneConfig:
    """How a query side is trained (defaults: the measured SciFact/NFCorpus recipe, docs/RESULTS.md).

    Attributes:
        mode: ``prompt`` | ``lora`` | ``full``: what is trained on the query side.
        prompt_length: P, prefix length (``prompt``).
        prompt_dropout: Dropout on the prefix while training (``prompt``).
        prompt_gate: A gated prefix (``model.prompt_gate``): it starts as exactly the frozen backbone.
        prompt_projection: Train the prefix through P-tuning v2's reparameterisation MLP (more trainable parameters).
        lora_rank: r of LoRA on the query and value projections (``lora``); r = 10 on MiniLM is 92,160
            parameters, the same as P = 20.
        lr: Peak learning rate (0: :data:`DEFAULT_LR` of the mode).
        epochs: Passes over the training queries (the best epoch on dev is kept).
        batch_size: Queries per step.
        temperature: tau of :func:`corpus_nt_xent` (0.02 was better on SciFact dev, one or two relevant documents a
            query; it collapsed NFCorpus, dozens a query: docs/RESULTS.md).
        eh_weight, eh_margin: Weight and margin of :func:`corpus_hinge` (0: off).
        max_length: Token limit of queries.
        warmup_ratio: Fraction of steps of linear warmup (then linear decay to 0).
        patience: Stop after this many epochs without a better dev score (0: run every epoch).
        seed: Seeds the prompt init, dropout and the query order.
    """

    mode: str = "prompt"
    prompt_length: int = 20
    prompt_dropout: float = 0.1
    prompt_gate: bool = False
    prompt_projection: bool = False
    lora_rank: int = 10
    lr: float = 0.0
    epochs: int = 15
    batch_size: int = 32
    temperature: float = 0.05
    eh_weight: float = 0.0
    eh_margin: float = 0.2
    max_length: int = 64
    warmup_ratio: float = 0.1
    patience: int = 4
    seed: int = 42

    def check(self) -> None:
        """Refuse values no run could use (naming the field)."""
        if self.mode not in MODES:
            raise PromcseError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}", key="mode")
        for name in ("prompt_length", "lora_rank", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise PromcseError(f"must be at least 1, got {getattr(self, name)}", key=name)
        for name in ("lr", "temperature", "eh_weight", "warmup_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "temperature" and value == 0):
                raise PromcseError(f"must be a finite number >= 0 (temperature > 0), got {value}", key=name)

    @property
    def peak_lr(self) -> float:
        """``lr``, or the mode's default."""
        return self.lr or DEFAULT_LR[self.mode]


@dataclass(frozen=True)
class QueryRows:
    """Training queries and, for each, the corpus vector rows judged relevant (at least one).

    Attributes:
        texts: Query texts.
        relevant: For each query, rows of :attr:`CorpusVectors.vectors` relevant to it.
    """

    texts: list[str]
    relevant: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class QueryTuneResult:
    """What a query-side run reports.

    Attributes:
        best_dev: Best dev score seen (None without a dev scorer).
        best_epoch: The epoch whose weights were kept (the last one without a dev scorer).
        history: ``(epoch, dev score)`` after every epoch.
        seconds: Wall time of the training loop.
        steps: Optimizer steps taken.
        trainable: Number of trained parameters.
        train_loss: Mean training loss of each epoch (dropout on), to tell underfitting from overfitting.
    """

    best_dev: float | None
    best_epoch: int
    seconds: float
    steps: int
    trainable: int
    history: list[tuple[int, float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)


def relevant_rows(data: BeirData, corpus: CorpusVectors) -> list[list[int]]:
    """For each judged query of ``data`` (in order), the rows of ``corpus`` judged relevant to it (score > 0)."""
    row_of = {data.doc_ids[i]: row for row, i in enumerate(corpus.rows)}
    return [sorted(row_of[d] for d, score in data.qrels[q].items() if score > 0 and d in row_of)
            for q in data.query_ids]


def labelled_rows(data: BeirData, corpus: CorpusVectors) -> QueryRows:
    """The judged queries of ``data`` with their relevant documents (score > 0) as rows of ``corpus``.

    Raises:
        PromcseError: When no query has a relevant document with text.
    """
    pairs = [(t, r) for t, r in zip(data.query_texts, relevant_rows(data, corpus)) if r]
    if not pairs:
        raise PromcseError(f"no query of split {data.split!r} has a relevant document with text",
                           path=data.folder / "qrels" / f"{data.split}.tsv")
    return QueryRows([t for t, _ in pairs], [r for _, r in pairs])


def query_encoder(backbone: str, config: QueryTuneConfig) -> SentenceEncoder:
    """A fresh query side over the backbone (mean pooling, as the frozen document side)."""
    model, tokenizer = load_backbone(backbone)
    shape = shape_of(model.config)
    prompt = None
    if config.mode == "prompt":  # positions unshifted: at init the prompt barely moves the frozen model's vectors
        prompt = PromptSpec.for_backbone(shape, config.prompt_length, dropout=config.prompt_dropout, init_std=0.02,
                                         shift_positions=False, gate=config.prompt_gate,
                                         projection=config.prompt_projection)
    mode = {"prompt": "prompt", "lora": "frozen", "full": "full"}[config.mode]
    encoder = build_encoder(EncoderSpec(backbone=backbone, shape=shape, mode=mode, prompt=prompt, pooler="avg"),
                            model, tokenizer)
    if config.mode == "lora":
        add_lora(encoder, config.lora_rank)
    return encoder


def add_lora(encoder: SentenceEncoder, rank: int) -> None:
    """LoRA adapters (PEFT) on every attention query and value projection; only they train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise PromcseError('LoRA needs PEFT: pip install "promcse[peft]"', key="mode") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules=["query", "value"])
    inject_adapter_in_model(config, encoder.backbone)
    for name, parameter in encoder.backbone.named_parameters():
        parameter.requires_grad = "lora_" in name


def retrieval_dev_scorer(dev: BeirData, corpus: CorpusVectors, metric: str = "ndcg@10",
                         batch_size: int = 128, max_length: int = 64) -> Scorer:
    """Score a query side on a dev split against the fixed corpus vectors (mean ``metric`` x100)."""

    def score(encoder: SentenceEncoder) -> float:
        vectors = encoder.encode(dev.query_texts, batch_size=batch_size, show_progress=False, max_length=max_length,
                                 normalize=True)
        return float(score_vectors(dev, np.asarray(vectors, dtype=np.float32), corpus)["metrics"][metric])

    return score


def _batches(n: int, size: int, epoch: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + size] for i in range(0, n, size)]


def _mask(relevant: list[list[int]], rows: np.ndarray, n_docs: int) -> torch.Tensor:
    mask = torch.zeros(len(rows), n_docs, dtype=torch.bool)
    for i, row in enumerate(rows):
        mask[i, relevant[row]] = True
    return mask


def _loss(encoder: SentenceEncoder, rows: QueryRows, batch: np.ndarray, documents: torch.Tensor,
          config: QueryTuneConfig) -> torch.Tensor:
    inputs = encoder.tokenize([rows.texts[i] for i in batch], config.max_length)
    sim = query_corpus_similarity(encoder(inputs), documents)
    relevant = _mask(rows.relevant, batch, documents.shape[0]).to(sim.device)
    loss = corpus_nt_xent(sim, relevant, config.temperature)
    if config.eh_weight:
        loss = loss + config.eh_weight * corpus_hinge(sim, relevant, config.eh_margin)
    return loss


def _snapshot(encoder: SentenceEncoder) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in encoder.trainable_tensors().items()}


def _restore(encoder: SentenceEncoder, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in encoder.trainable_tensors().items():
            tensor.copy_(state[name])


def _epoch(encoder: SentenceEncoder, rows: QueryRows, documents: torch.Tensor, config: QueryTuneConfig,
           optimizer: torch.optim.Optimizer, scheduler: object, epoch: int, bar: tqdm) -> float:
    """One pass over the queries; returns the mean loss."""
    encoder.train()
    total, batches = 0.0, _batches(len(rows), config.batch_size, epoch, config.seed)
    for batch in batches:
        loss = _loss(encoder, rows, batch, documents, config)
        if not math.isfinite(float(loss.detach())):
            raise PromcseError(f"loss became {float(loss.detach())} in epoch {epoch}; lower the learning rate", key="lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.trainable_parameters(), 1.0)
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        bar.update(1)
        total += float(loss.detach())
    return total / len(batches)


def fit_queries(encoder: SentenceEncoder, rows: QueryRows, corpus: CorpusVectors, config: QueryTuneConfig,
                dev_scorer: Scorer | None = None, show_progress: bool = True) -> QueryTuneResult:
    """Train ``encoder``'s trainable tensors on ``rows`` against ``corpus``; keep the best epoch by ``dev_scorer``.

    On return the encoder holds the kept weights (in eval mode).
    """
    config.check()
    torch.manual_seed(config.seed)
    documents = torch.from_numpy(np.ascontiguousarray(corpus.vectors)).to(encoder.device)
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(encoder.trainable_parameters(), lr=config.peak_lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * config.warmup_ratio), total)
    best, best_epoch, history, losses, state = -math.inf, 0, [], [], _snapshot(encoder)
    if dev_scorer is not None:  # epoch 0: the untrained side, so a run never ends worse than its start on dev
        best = dev_scorer(encoder.eval())
        history.append((0, best))
    start, done = time.time(), 0
    with tqdm(total=total, desc="adapt", unit="step", disable=not show_progress, dynamic_ncols=True) as bar:
        for epoch in range(1, config.epochs + 1):
            losses.append(_epoch(encoder, rows, documents, config, optimizer, scheduler, epoch, bar))
            done = epoch * steps_per_epoch
            if dev_scorer is None:
                best_epoch = epoch
                continue
            score = dev_scorer(encoder.eval())
            history.append((epoch, score))
            bar.write(f"epoch {epoch}: dev {score:.2f}")
            if score > best:
                best, best_epoch, state = score, epoch, _snapshot(encoder)
            elif config.patience and epoch - best_epoch >= config.patience:
                break
    if dev_scorer is not None:
        _restore(encoder, state)
    trainable = sum(t.numel() for t in encoder.trainable_tensors().values())
    return QueryTuneResult(None if dev_scorer is None else best, best_epoch, time.time() - start, done, trainable,
                           history, losses)

