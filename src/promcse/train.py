"""The training loop: contrastive learning of a deep prompt (or the whole encoder) on sentences.

One step: tokenize every view of the batch together, one forward pass, split into anchor /
positive / hard-negative embeddings, loss terms from :mod:`promcse.losses`, backward, clip, AdamW,
linear decay. Every ``eval_every`` steps the model is scored on STS-B dev and the best is kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from promcse.backbone import load_backbone, shape_of
from promcse.config import RunConfig, save_config
from promcse.data import TrainExamples, read_training_file
from promcse.distributed import (
    DistContext,
    all_reduce_gradients,
    broadcast_parameters,
    context,
    describe_scale,
    fit_batches,
    gather_columns,
    setup,
    shard_rows,
    teardown,
)
from promcse.encode import encode_texts, resolve_device
from promcse.errors import PromcseError
from promcse.gradcache import forward_chunks, grad_cache_step, length_chunks
from promcse.loop import TrainResult, check_disk_space, restore, run_loop
from promcse.resume import latest_state
from promcse.losses import LOSSES
from promcse.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.prompt import PromptSpec
from promcse.tiled import TILED_LOSSES

BUNDLED = "bundled:"
logger = logging.getLogger(__name__)


def bundled_path(name: str) -> Path:
    """Path of a data file shipped inside the package (``resources/data/train/NAME``)."""
    path = Path(str(resources.files("promcse") / "resources" / "data" / "train" / name))
    if not path.is_file():
        available = sorted(p.name for p in path.parent.iterdir())
        raise PromcseError(f"no bundled file '{name}'; available: {', '.join(available)}", key="data.train_file")
    return path


def resolve_train_file(name: str) -> Path:
    """Map ``bundled:NAME`` to the packaged file; leave other paths as given."""
    return bundled_path(name[len(BUNDLED):]) if name.startswith(BUNDLED) else Path(name)


def load_examples(config: RunConfig) -> TrainExamples:
    """Read and validate the training data before any model is loaded."""
    needs_negatives = config.loss.name == "nt_xent_eh"
    path = resolve_train_file(config.data.train_file)
    examples = read_training_file(path, require_hard_negatives=needs_negatives)
    if len(examples) < config.train.batch_size:
        raise PromcseError(
            f"{len(examples)} training rows are fewer than one batch ({config.train.batch_size})", path=path
        )
    if config.loss.name == "supcon":
        raise PromcseError("supcon needs class labels; the training readers provide pairs", key="loss.name")
    return examples


def encoder_spec(config: RunConfig, backbone: Any) -> EncoderSpec:
    """Encoder spec for a fresh run."""
    m = config.model
    shape = shape_of(backbone.config)
    prompt = None
    if m.prompt_length > 0:
        prompt = PromptSpec.for_backbone(
            shape, m.prompt_length, projection=m.prompt_projection, projection_hidden=m.prompt_projection_hidden,
            dropout=m.prompt_dropout, init_std=m.prompt_init_std, shift_positions=m.shift_positions,
        )
    return EncoderSpec(backbone=m.backbone, shape=shape, mode=m.mode, prompt=prompt, pooler=m.pooler, head=m.head)


def report_truncation(tokenizer: Any, examples: TrainExamples, max_length: int) -> str | None:
    """Count training texts longer than ``data.max_length`` tokens (they are truncated, as in the recipes)."""
    texts = [t for view in (examples.anchor, examples.positive, examples.negative) if view for t in view]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    cut = sum(n > max_length for n in lengths)
    if not cut:
        return None
    return (f"note: {cut} of {len(texts)} training texts ({100 * cut / len(texts):.1f}%) are longer than "
            f"{max_length} tokens and are truncated (data.max_length)")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_order(n_rows: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Shuffled row indices per step over all epochs; a last batch of < 2 rows is dropped."""
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    for _ in range(epochs):
        perm = rng.permutation(n_rows)
        batches.extend(perm[i : i + batch_size] for i in range(0, n_rows, batch_size))
        if len(batches[-1]) < 2:
            batches.pop()
    return batches


def batch_views(examples: TrainExamples, rows: np.ndarray) -> list[list[str]]:
    """The views of a batch: [anchor, positive(, negative)]; unsupervised positives are the anchors."""
    anchor = [examples.anchor[i] for i in rows]
    positive = anchor if examples.positive is None else [examples.positive[i] for i in rows]
    views = [anchor, positive]
    if examples.negative is not None:
        views.append([examples.negative[i] for i in rows])
    return views


def embed_views(encoder: SentenceEncoder, views: list[list[str]], max_length: int) -> list[torch.Tensor]:
    """Embed all views: one tokenization, forwards grouped by length (each row its own dropout masks).

    Rows are sorted by token count and forwarded in a few groups, each padded only to its own
    longest row (:func:`promcse.gradcache.length_chunks`): same embeddings, far fewer padded tokens.
    """
    flat = [text for view in views for text in view]
    embeddings = forward_chunks(encoder, length_chunks(encoder.tokenize(flat, max_length)))
    return list(embeddings.split(len(views[0])))


def loss_terms(config: RunConfig, views: list[torch.Tensor], offset: int = 0) -> dict[str, torch.Tensor]:
    """Named loss terms from the registry (tiled when ``loss.tile_size`` > 0); ``loss`` is minimised.

    ``views`` are ``[anchor, positive(, negative)]``; ``offset`` is the row of anchor 0's positive
    among the positives (non-zero when the positives were gathered from several processes).
    """
    lo = config.loss
    negative = views[2] if len(views) > 2 else None
    kwargs: dict[str, Any] = {"temperature": lo.temperature, "hard_negative_weight": lo.hard_negative_weight}
    if lo.name == "nt_xent_eh":
        kwargs.update(eh_weight=lo.eh_weight, eh_margin=lo.eh_margin)
    if offset:
        kwargs["offset"] = offset
    if lo.tile_size > 0:
        return TILED_LOSSES[lo.name](views[0], views[1], negative, tile_size=lo.tile_size, **kwargs)
    return LOSSES[lo.name](views[0], views[1], negative, **kwargs)


def global_loss_terms(config: RunConfig, views: list[torch.Tensor], dist: DistContext) -> dict[str, torch.Tensor]:
    """Loss of this process's anchors against the positives (and hard negatives) of every process."""
    anchor, positive, negative, offset = gather_columns(views, dist)
    return loss_terms(config, [anchor, positive] + ([negative] if negative is not None else []), offset)


def make_optimizer(encoder: SentenceEncoder, config: RunConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over trainable parameters only, linear warmup/decay to 0."""
    params = encoder.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    warmup = int(total_steps * config.train.warmup_ratio)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def dev_scorer(config: RunConfig) -> Callable[[SentenceEncoder], float]:
    """Return a function scoring an encoder on STS-B dev (Spearman x100); data read once, up front."""
    from promcse.sts import evaluate

    data_dir = config.data.eval_data_dir or None

    def score(encoder: SentenceEncoder) -> float:
        result = evaluate(lambda texts: encode_texts(encoder, texts, batch_size=128), ["stsb-dev"], data_dir,
                          alignment_uniformity=False)
        return float(result["tasks"]["STSBenchmark-dev"]["spearman"])

    return score


def step_loss(config: RunConfig, dist: DistContext) -> Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """The step's loss on view embeddings: global (gathered) and in fp32 even inside bf16 autocast."""

    def loss_fn(embedded: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(embedded[0].device.type, enabled=False):
            return global_loss_terms(config, [e.float() for e in embedded], dist)

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


def train_step(encoder: SentenceEncoder, config: RunConfig, examples: TrainExamples, rows: np.ndarray,
               optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, float]:
    """One optimizer step on the global batch ``rows``; returns the (global) loss terms as floats.

    Plain: one forward of all views, loss, backward. With ``train.grad_cache_chunk`` > 0: GradCache
    (:mod:`promcse.gradcache`), same loss and gradients in the memory of one chunk.
    ``train.precision=bf16`` autocasts the encoder passes; the loss is computed in fp32. Under
    ``torchrun`` this process takes its shard of ``rows``, contrasts against every process's rows,
    and the gradients are averaged with one all-reduce after the backward pass(es)
    (:mod:`promcse.distributed`).
    """
    dist = context()
    views = batch_views(examples, shard_rows(rows, dist))
    loss_fn = step_loss(config, dist)
    optimizer.zero_grad(set_to_none=True)
    chunk = config.train.grad_cache_chunk
    with torch.autocast(encoder.device.type, torch.bfloat16, enabled=config.train.precision == "bf16"), \
            attention_kernels(encoder.device):
        if chunk > 0:
            inputs = encoder.tokenize([text for view in views for text in view], config.data.max_length)
            terms = grad_cache_step(encoder, length_chunks(inputs, max_rows=chunk), loss_fn, len(views[0]))
        else:
            terms = loss_fn(embed_views(encoder, views, config.data.max_length))
            terms["loss"].backward()
    terms = all_reduce_gradients(encoder.trainable_parameters(), terms, dist)
    if config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(encoder.trainable_parameters(), config.train.grad_clip)
    optimizer.step()
    scheduler.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def train(config: RunConfig, output_dir: str | Path, show_progress: bool = True,
          encoder: SentenceEncoder | None = None, resume: bool = False) -> TrainResult:
    """Train per ``config``; saves the best (or last) checkpoint, ``metrics.jsonl`` and the config.

    With ``resume``, continue the run in ``output_dir`` from its newest saved state (``train.save_every``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this; rank 0 alone evaluates, logs
    and writes the output directory.

    Raises:
        PromcseError: Bad data, config or output directory (all checked before the first step).
    """
    device = resolve_device(config.train.device)
    dist = setup(device)
    try:
        if resume and dist.world_size > 1:
            raise PromcseError("--resume supports single-process runs; restart multi-process runs from the checkpoint")
        out = prepare_output(output_dir) if dist.is_main else Path(output_dir)
        if resume:
            latest_state(out)  # fail before loading anything when there is nothing to resume
        examples = load_examples(config)
        seed_everything(config.train.seed)
        if encoder is None:
            backbone, tokenizer = load_backbone(config.model.backbone)
            encoder = build_encoder(encoder_spec(config, backbone), backbone, tokenizer)
        encoder.to(device)
        if dist.world_size > 1:
            broadcast_parameters(encoder.trainable_parameters(), dist)
            torch.manual_seed(config.train.seed + dist.rank)  # same start, but different dropout per rank
        batches = batch_order(len(examples), config.train.batch_size, config.train.epochs, config.train.seed)
        batches = fit_batches(batches[: config.train.max_steps or None], dist.world_size)
        optimizer, scheduler = make_optimizer(encoder, config, len(batches))
        announce_scale(config, examples, dist, show_progress)
        note = report_truncation(encoder.tokenizer, examples, config.data.max_length) if dist.is_main else None
        if note and show_progress:
            tqdm.write(note)
        if not dist.is_main:
            return _follow(encoder, config, examples, batches, optimizer, scheduler, out)
        state = None
        if resume:
            state = restore(out, encoder, optimizer, scheduler)
            tqdm.write(f"resuming {out} at step {state.step} of {len(batches)}")
        else:
            check_disk_space(out, encoder, config)
            save_config(config, out / "run_config.yaml")
        scorer = dev_scorer(config) if config.train.eval_every >= 0 else None
        return run_loop(encoder, config, examples, batches, optimizer, scheduler, scorer, out, show_progress,
                        train_step, state)
    finally:
        teardown(dist)


def announce_scale(config: RunConfig, examples: TrainExamples, dist: DistContext, show_progress: bool) -> None:
    """Log (rank 0) the global batch and the effective number of negatives per anchor."""
    if not dist.is_main:
        return
    local = config.train.batch_size // dist.world_size
    line = describe_scale(local, dist, examples.has_hard_negatives, config.train.grad_cache_chunk)
    logger.info(line)
    if show_progress and (dist.world_size > 1 or config.train.grad_cache_chunk):
        tqdm.write(line)


def _follow(encoder: SentenceEncoder, config: RunConfig, examples: TrainExamples, batches: list[np.ndarray],
            optimizer: torch.optim.Optimizer, scheduler: Any, out: Path) -> TrainResult:
    """Steps of a rank > 0: train in lockstep with rank 0; no evaluation, logging or checkpoints."""
    start = time.time()
    encoder.train()
    for step, rows in enumerate(batches, start=1):
        terms = train_step(encoder, config, examples, rows, optimizer, scheduler)
        if not math.isfinite(terms["loss"]):
            raise PromcseError(f"loss became {terms['loss']} at step {step}; lower train.lr", key="train.lr")
    return TrainResult(out, len(batches), None, len(batches), time.time() - start)


def prepare_output(output_dir: str | Path) -> Path:
    """Create the output directory and check that it is writable before any compute."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise PromcseError(f"output directory is not writable: {err.strerror}", path=out) from None
    return out
