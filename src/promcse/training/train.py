"""Setting up a training run: data, encoder, optimizer, output directory; then :func:`promcse.training.loop.run_loop`.

Everything that can be wrong with the data, the config or the output directory is checked here before
the model loads and before the first step. The step itself is :mod:`promcse.training.step`, the loop
:mod:`promcse.training.loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from promcse.encoder.backbone import load_backbone, resolve_device, shape_of
from promcse.training.callbacks import Callback, EarlyStopping, reporters
from promcse.training.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig, build_objective, save_config
from promcse.io.data import LABEL_COLUMN, TrainExamples, batch_order, read_training_file, resolve_train_file
from promcse.training.distributed import DistContext, broadcast_parameters, describe_scale, fit_batches, setup, teardown
from promcse.encoder.encode import encode_texts
from promcse.errors import PromcseError
from promcse.io.files import directory_lock
from promcse.training.loop import TrainingRun, TrainResult, run_loop
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.objectives.objective import OBJECTIVES, Objective
from promcse.encoder.prompt import PromptSpec
from promcse.training.resume import claim_run_dir, LoopState, latest_state, load_state
from promcse.io.sources import Mixture, mixture_batch_order
from promcse.io.tables import examples_from_table
from promcse.training.teacher import TeacherCache, build_source_caches

logger = logging.getLogger(__name__)


def load_examples(data: DataConfig, objective: Objective, batch_size: int,
                  table: object | None = None) -> TrainExamples | Mixture:
    """Read and validate the training data (before any model is loaded) for what ``objective`` needs.

    ``table`` (a ``datasets.Dataset``, pandas ``DataFrame``, dict of columns or list of rows;
    :func:`promcse.io.tables.examples_from_table`) replaces ``data.train_file`` and ``data.sources``.

    With ``data.sources`` every file is read (``data.train_file`` is not used); hard negatives are then
    required of every source only for a hard-negative bonus (EH works over the other positives without them).
    """
    if table is not None:
        examples = examples_from_table(table, require_hard_negatives=objective.needs_hard_negatives)
        if len(examples) < batch_size:
            raise PromcseError(f"{len(examples)} training rows are fewer than one batch ({batch_size})",
                               path=examples.source)
        return _check_labels(examples, objective)
    if not data.sources:
        return _check_labels(_read_source(data.train_file, objective.needs_hard_negatives, batch_size), objective)
    needs = objective.hard_negative_weight != 0.0
    parts = tuple(_check_labels(_read_source(src.file, needs, batch_size), objective) for src in data.sources)
    return Mixture(parts, tuple(src.weight for src in data.sources), tuple(src.contrastive for src in data.sources))


def _check_labels(examples: TrainExamples, objective: Objective) -> TrainExamples:
    """SupCon needs a ``label`` column (refused here, before any model loads)."""
    if not objective.needs_labels:
        return examples
    if examples.labels is None:
        raise PromcseError(f"loss.name={objective.name} needs a '{LABEL_COLUMN}' column (a class per row)",
                           path=examples.source, line=1)
    return examples


def _read_source(name: str, require_hard_negatives: bool, batch_size: int) -> TrainExamples:
    path = resolve_train_file(name)
    examples = read_training_file(path, require_hard_negatives=require_hard_negatives)
    if len(examples) < batch_size:
        raise PromcseError(f"{len(examples)} training rows are fewer than one batch ({batch_size})", path=path)
    return examples


def load_teacher(loss: LossConfig, examples: TrainExamples | Mixture, out: Path, device: torch.device,
                 show_progress: bool) -> TeacherCache | None:
    """The teacher's embeddings of every training text (``loss.distill_teacher``), cached per source; None
    without one."""
    if not loss.distill_teacher:
        return None
    cache = Path(loss.distill_cache) if loss.distill_cache else out / "teacher_cache"
    parts = examples.parts if isinstance(examples, Mixture) else (examples,)
    return build_source_caches(loss.distill_teacher, [part.texts() for part in parts], cache, device=str(device),
                               show_progress=show_progress)


def check_teacher(objective: Objective, teacher: TeacherCache | None, encoder: SentenceEncoder) -> None:
    """Contrastive distillation compares student and teacher vectors directly: their dimensions must agree."""
    if teacher is not None and objective.distill == "contrastive" and teacher.dim != encoder.dim:
        raise PromcseError(f"contrastive distillation needs the teacher's dimension ({teacher.dim}) to equal the "
                           f"student's ({encoder.dim}); use loss.distill=similarity across dimensions",
                           key="loss.distill")


def encoder_spec(model: ModelConfig, backbone: Any) -> EncoderSpec:
    """Encoder spec for a fresh run."""
    shape = shape_of(backbone.config)
    prompt = None
    if model.prompt_length > 0:
        prompt = PromptSpec.for_backbone(
            shape, model.prompt_length, projection=model.prompt_projection,
            projection_hidden=model.prompt_projection_hidden, dropout=model.prompt_dropout,
            init_std=model.prompt_init_std, shift_positions=model.shift_positions, gate=model.prompt_gate,
        )
    return EncoderSpec(backbone=model.backbone, shape=shape, mode=model.mode, prompt=prompt, pooler=model.pooler,
                       head=model.head)


def report_truncation(tokenizer: Any, examples: TrainExamples, max_length: int) -> str | None:
    """Count training texts longer than ``data.max_length`` tokens (they are truncated, as in the recipes)."""
    texts = examples.texts()
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


def make_optimizer(encoder: SentenceEncoder, train: TrainConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over trainable parameters only; linear warmup (``train.warmup_ratio``) then linear decay to 0.

    With ``train.gate_lr`` > 0 the gates of a gated prefix (``prompt.gate``) form a second parameter group at
    that peak rate (the schedule scales both groups alike); every other tensor trains at ``train.lr``.
    """
    gate = getattr(encoder.prompt, "gate", None) if train.gate_lr > 0 else None
    groups: list[dict[str, Any]] = [{"params": [p for p in encoder.trainable_parameters() if p is not gate]}]
    if gate is not None:
        groups.append({"params": [gate], "lr": train.gate_lr})
    optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    warmup = int(total_steps * train.warmup_ratio)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def dev_scorer(data: DataConfig) -> Callable[[SentenceEncoder], float]:
    """The model-selection scorer ``data.dev`` names: STS-B dev Spearman x100, or retrieval dev nDCG@10 x100."""
    if data.dev == "stsb":
        from promcse.evaluation.sts import score_split

        data_dir = data.eval_data_dir or None
        return lambda encoder: score_split(lambda texts: encode_texts(encoder, texts, batch_size=128), "stsb-dev",
                                           data_dir)
    from promcse.evaluation.beir import read_beir
    from promcse.evaluation.retrieval import evaluate_encoder

    folder, _, split = data.dev.removeprefix("retrieval:").partition(":")
    beir = read_beir(folder, split or "dev")  # read (and checked) once, before the first step
    return lambda encoder: evaluate_encoder(encoder, beir, max_length=data.max_length, cache=False,
                                            show_progress=False)["metrics"]["ndcg@10"]


def dev_label(data: DataConfig, custom: bool) -> str:
    """The name the dev score is logged and saved under."""
    return "dev" if custom else ("stsb_dev" if data.dev == "stsb" else "retrieval_dev_ndcg@10")


def train(config: RunConfig, output_dir: str | Path, show_progress: bool = True,
          encoder: SentenceEncoder | None = None, resume: bool = False, overwrite: bool = False,
          evaluator: Callable[[SentenceEncoder], float] | None = None,
          callbacks: list[Callback] | None = None, train_data: object | None = None) -> TrainResult:
    """Train per ``config``; saves the best (or last) checkpoint, ``metrics.jsonl`` and the config.

    With ``resume``, continue the run in ``output_dir`` from its newest saved state (``train.save_every``).
    One directory holds one run: a new run into a directory holding another run's files is refused, unless
    ``overwrite`` (then that run's states and checkpoint are deleted first).
    ``evaluator`` replaces the model-selection scorer of ``data.dev``: any function of the encoder whose higher
    value is better (logged and saved as ``dev``). ``callbacks`` (:class:`promcse.training.callbacks.Callback`)
    are called on the main process, after the trackers of ``train.report_to`` and early stopping
    (``train.early_stopping_patience``). ``train_data`` (a ``datasets.Dataset``, a pandas ``DataFrame``, a dict of
    columns or a list of row dicts, with a training file's columns) replaces ``data.train_file``.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this; rank 0 alone evaluates, logs
    and writes the output directory.

    Raises:
        PromcseError: Bad data, config or output directory (all checked before the first step).
    """
    device = resolve_device(config.train.device)
    dist = setup(device)
    try:
        if resume and dist.world_size > 1:
            raise PromcseError("supports single-process runs only; restart multi-process runs from the checkpoint",
                               key="resume")
        if not OBJECTIVES[config.loss.name].multi_process and dist.world_size > 1:
            raise PromcseError(f"loss.name={config.loss.name} runs on one process for now (its labels are not "
                               "gathered across processes); drop torchrun or use nt_xent", key="loss.name")
        out = prepare_output(output_dir) if dist.is_main else Path(output_dir)
        with directory_lock(out, "promcse train") if dist.is_main else contextlib.nullcontext():
            if resume:
                latest_state(out)  # fail before loading anything when there is nothing to resume
            elif dist.is_main:
                claim_run_dir(out, overwrite)
            objective = build_objective(config.loss)
            examples = load_examples(config.data, objective, config.train.batch_size, train_data)
            if train_data is not None:  # the saved run config names the table, not a file it never read
                config = dataclasses.replace(config, data=dataclasses.replace(
                    config.data, train_file=f"<{examples.source}: {len(examples)} rows>", sources=[]))
            teacher = load_teacher(config.loss, examples, out, device, show_progress and dist.is_main)
            run = _build_run(config, objective, examples, encoder, device, dist, out, show_progress, evaluator)
            run.callbacks = _callbacks(config, out, dist, callbacks) if dist.is_main else []
            check_teacher(objective, teacher, run.encoder)
            run.teacher = teacher
            return run_loop(run, _starting_state(run, config, resume))
    finally:
        teardown(dist)


def _build_run(config: RunConfig, objective: Objective, examples: TrainExamples | Mixture, encoder: SentenceEncoder | None,
               device: torch.device, dist: DistContext, out: Path, show_progress: bool,
               evaluator: Callable[[SentenceEncoder], float] | None = None) -> TrainingRun:
    """Seed, build (or take) the encoder, the step order and the optimizer."""
    t = config.train
    seed_everything(t.seed)
    if encoder is None:
        backbone, tokenizer = load_backbone(config.model.backbone)
        encoder = build_encoder(encoder_spec(config.model, backbone), backbone, tokenizer)
    encoder.to(device)
    if dist.world_size > 1:
        broadcast_parameters(encoder.trainable_parameters(), dist)
        torch.manual_seed(t.seed + dist.rank)  # same start, but different dropout per rank
    if isinstance(examples, Mixture):
        batches = mixture_batch_order(examples, t.batch_size, t.epochs, t.seed)
    else:
        batches = batch_order(len(examples), t.batch_size, t.epochs, t.seed)
    batches = fit_batches(batches[: t.max_steps or None], dist.world_size)
    optimizer, scheduler = make_optimizer(encoder, t, len(batches))
    announce_scale(t, examples, dist, show_progress)
    note = report_truncation(encoder.tokenizer, examples, config.data.max_length) if dist.is_main else None
    if note and show_progress:
        tqdm.write(note)
    scorer = (evaluator or dev_scorer(config.data)) if t.eval_every >= 0 and dist.is_main else None
    return TrainingRun(encoder, objective, examples, batches, optimizer, scheduler, t, config.data.max_length, out,
                       dist, scorer, {"run_config": config.to_dict(), "train_rows": len(examples)}, show_progress,
                       dev_name=dev_label(config.data, evaluator is not None))


def _callbacks(config: RunConfig, out: Path, dist: DistContext, extra: list[Callback] | None) -> list[Callback]:
    """The trackers of ``train.report_to`` (given the run config), early stopping, then the caller's callbacks."""
    t = config.train
    stopping: list[Callback] = []
    if t.early_stopping_patience:
        if dist.world_size > 1:
            raise PromcseError("early stopping runs on one process (the others could not learn of the stop)",
                               key="train.early_stopping_patience")
        stopping.append(EarlyStopping(t.early_stopping_patience))
    return [*reporters(t.report_to, out, config.to_dict()), *stopping, *(extra or [])]


def _starting_state(run: TrainingRun, config: RunConfig, resume: bool) -> LoopState | None:
    """The saved state to continue from (``resume``), else prepare a fresh run directory."""
    if not run.dist.is_main:
        return None
    if resume:
        state = load_state(latest_state(run.out), run.encoder.trainable_tensors(), run.optimizer, run.scheduler)
        tqdm.write(f"resuming {run.out} at step {state.step} of {len(run.batches)}")
        return state
    check_disk_space(run.out, run.encoder, run.train)
    save_config(config, run.out / "run_config.yaml")
    return None


def announce_scale(train: TrainConfig, examples: TrainExamples | Mixture, dist: DistContext, show_progress: bool) -> None:
    """Log (rank 0) the global batch and the effective number of negatives per anchor."""
    if not dist.is_main:
        return
    line = describe_scale(train.batch_size // dist.world_size, dist, examples.has_hard_negatives,
                          train.grad_cache_chunk)
    logger.info(line)
    if show_progress and (dist.world_size > 1 or train.grad_cache_chunk):
        tqdm.write(line)


def check_disk_space(out: Path, encoder: SentenceEncoder, train: TrainConfig) -> None:
    """Refuse to start when the output disk cannot hold the checkpoint and the kept states."""
    tensor_bytes = sum(p.numel() * p.element_size() for p in encoder.trainable_tensors().values())
    states = train.keep_states if train.save_every else 0
    needed = tensor_bytes * (1 + 3 * (states + 1)) + 50 * 2**20  # weights + Adam moments per state + slack
    free = shutil.disk_usage(out).free
    if free < needed:
        raise PromcseError(f"only {free / 2**20:.0f} MiB free, about {needed / 2**20:.0f} MiB needed", path=out)


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
