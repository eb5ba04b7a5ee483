"""Run configuration: dataclasses with defaults and help, loaded from YAML plus ``key=value`` overrides.

Every value is type-checked against its field and unknown keys are rejected with a "did you mean",
all before any model is loaded. The resolved config is saved next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promcse.errors import PromcseError

if typing.TYPE_CHECKING:  # the objectives load torch, which `promcse --help` should not wait for
    from promcse.objectives.objective import Objective, ObjectiveKind


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """What encoder to train."""

    backbone: str = _f("minilm", "HF name, local path, or 'minilm' (bundled all-MiniLM-L6-v2)")
    mode: str = _f("prompt", "'prompt': frozen backbone + deep prompt (PromCSE); 'full': fine-tune everything (SimCSE)")
    prompt_length: int = _f(10, "prefix length P (0 = no prompt; required > 0 in prompt mode)")
    prompt_projection: bool = _f(False, "reparameterise the prefix through an MLP (P-tuning v2 'prefix_projection')")
    prompt_projection_hidden: int = _f(512, "hidden width of the reparameterisation MLP")
    prompt_dropout: float = _f(0.1, "dropout on the prefix at training time")
    prompt_init_std: float = _f(0.02, "std of the N(0, std) init of the prefix table")
    shift_positions: bool = _f(True, "real tokens' positions start at P as in the reference (False: keep the backbone's positions; better for a fresh prompt)")
    prompt_gate: bool = _f(False, "gated prefix (LLaMA-Adapter zero-init attention): the prefix gets its own softmax, scaled by tanh(g) per layer and head with g = 0 at init, so training starts exactly from the frozen backbone; needs shift_positions=false")
    pooler: str = _f("avg", "cls | cls_before_pooler | avg | avg_first_last | avg_top2")
    head: str = _f("none", "MLP head: none | train_only (unsupervised recipe) | always (supervised recipe)")


@dataclass
class Source:
    """One training file of a multi-source run (``data.sources``)."""

    file: str = _f("", "training file, as data.train_file")
    weight: float = _f(1.0, "share of the steps drawn from this file (relative to the other sources)")
    contrastive: bool = _f(True, "apply the contrastive loss to its batches (false: distillation texts only)")


@dataclass
class DataConfig:
    """Where training and model-selection data come from."""

    train_file: str = _f("bundled:snli_triplets.csv", "training file: .txt (unsupervised) or .csv/.tsv/.jsonl with sent0,sent1[,hard_neg | hard_neg_1..k] (or sent0[,sent1],label for supcon); 'bundled:NAME' for packaged data")
    sources: list[Source] = field(default_factory=list, metadata={"help": "several training files in one run, replacing train_file: a YAML list of {file, weight, contrastive}; each step's batch comes from one file, drawn by weight"})
    max_length: int = _f(32, "truncate training inputs at this many tokens")
    eval_data_dir: str = _f("", "eval data dir (tsv/original/...); empty: PROMCSE_DATA_DIR or the bundled STS-B dev")
    dev: str = _f("stsb", "model selection: 'stsb' (STS-B dev Spearman) or 'retrieval:DIR[:SPLIT]' (nDCG@10 on a BEIR folder's split, default 'dev'; documents re-encoded by the model at data.max_length each evaluation)")


@dataclass
class LossConfig:
    """Contrastive objective."""

    name: str = _f("nt_xent", "nt_xent | nt_xent_eh (PromCSE supervised: + energy-based hinge, needs hard negatives) | supcon (SupCon: needs a label column) | distill (distillation alone; needs loss.distill_teacher)")
    temperature: float = _f(0.05, "softmax temperature tau")
    hard_negative_weight: float = _f(0.0, "logit bonus w on each row's own hard negative")
    eh_weight: float = _f(10.0, "lambda: weight of the energy-based hinge loss (nt_xent_eh only)")
    eh_margin: float = _f(0.2, "m: margin of the energy-based hinge loss")
    distill_teacher: str = _f("", "teacher model for distillation (any promcse.load reference or a sentence-transformers directory); its embeddings of every training text are computed once and cached")
    distill: str = _f("similarity", "distillation loss: similarity (KL between in-batch similarity distributions; any dimension) | contrastive (student vs the teacher's batch embeddings; same dimension)")
    distill_weight: float = _f(1.0, "weight of the distillation term (added to the contrastive loss; loss.name=distill: alone)")
    distill_temperature: float = _f(0.05, "temperature of the distillation loss")
    distill_cache: str = _f("", "directory for the cached teacher embeddings (empty: <output>/teacher_cache)")
    tile_size: int = _f(0, "compute nt_xent / nt_xent_eh in tiles of this many rows x columns, never forming the B x B similarity matrix (same values and gradients; for batches of thousands); 0 = dense")


@dataclass
class TrainConfig:
    """Optimisation loop."""

    epochs: int = _f(1, "passes over the training data")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no limit)")
    batch_size: int = _f(64, "sentences (rows) per step")
    lr: float = _f(1e-2, "peak learning rate (AdamW, linear decay, no warmup)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    gate_lr: float = _f(0.0, "peak learning rate of the gates of a gated prefix (model.prompt_gate; 0 = train.lr): zero-initialised gates open slowly at the prompt's lr")
    warmup_ratio: float = _f(0.0, "fraction of steps with linear warmup")
    grad_clip: float = _f(1.0, "clip the gradient norm (0 = off)")
    seed: int = _f(42, "random seed")
    eval_every: int = _f(125, "evaluate on the dev scorer (data.dev) every N steps (0 = only at the end, -1 = never)")
    log_every: int = _f(10, "write a metrics line every N steps")
    device: str = _f("auto", "auto | cpu | cuda")
    save_every: int = _f(0, "write a resumable training state every N steps (0 = off); resume with --resume DIR")
    keep_states: int = _f(2, "how many saved training states to keep")
    grad_cache_chunk: int = _f(0, "GradCache chunk size in rows of all views together (0 = plain full-batch step); see docs/SCALING.md")
    report_to: str = _f("", "experiment trackers, comma-separated: tensorboard (event files under <output>/tensorboard; offline), mlflow (params and metrics; MLFLOW_TRACKING_URI, else a local store <output>/mlruns; experiment MLFLOW_EXPERIMENT_NAME, else promcse) or none; e.g. tensorboard,mlflow")
    early_stopping_patience: int = _f(0, "stop after this many evaluations in a row without a better dev score (0 = off; the best checkpoint is kept; single process only)")
    precision: str = _f("fp32", "fp32 | bf16: bf16 autocast for the forward passes (CUDA; on CPU bf16 matmuls are far slower than fp32)")


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (YAML/JSON-able)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig}


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid: {', '.join(options)}"


def _sources(value: Any, key: str) -> list[Source]:
    """``data.sources``: a list of mappings (or plain file names) to :class:`Source` entries, keys checked."""
    if not isinstance(value, list):
        raise PromcseError("expected a list of {file, weight, contrastive} entries", key=key)
    names = [f.name for f in dataclasses.fields(Source)]
    hints = typing.get_type_hints(Source)
    entries = []
    for number, item in enumerate(value):
        item = {"file": item} if isinstance(item, str) else item
        where = f"{key}[{number}]"
        if not isinstance(item, dict):
            raise PromcseError("each source must be a mapping like {file: a.csv, weight: 1}", key=where)
        for name in item:
            if name not in names:
                raise PromcseError(f"unknown key{_did_you_mean(str(name), names)}", key=f"{where}.{name}")
        entries.append(Source(**{n: _coerce(v, hints[n], f"{where}.{n}") for n, v in item.items()}))
    return entries


def _float(value: Any) -> float | None:
    """A YAML number or numeric string as a float (inf/nan included, for the caller to refuse), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            return math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check/convert one value to a field's type (YAML already parsed scalars)."""
    if typing.get_origin(kind) is list:
        return _sources(value, key)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value.strip()) <= 19:
            return int(value)
    elif kind is float:
        number = _float(value)
        if number is not None:
            if not math.isfinite(number):  # inf/nan would train to a checkpoint nothing can load
                raise PromcseError(f"must be a finite number, got {value!r}", key=key)
            return number
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return os.path.expandvars(str(value))  # "${DATA}/train.csv" works in configs
    raise PromcseError(f"expected {kind.__name__}, got {value!r}", key=key)


def _set(config: RunConfig, dotted: str, value: Any) -> None:
    if "." not in dotted:
        raise PromcseError(f"keys look like section.name{_did_you_mean(dotted, list(SECTIONS))}", key=dotted)
    section_name, name = dotted.split(".", 1)
    if section_name not in SECTIONS:
        raise PromcseError(f"unknown section{_did_you_mean(section_name, list(SECTIONS))}", key=dotted)
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise PromcseError(f"unknown key{_did_you_mean(name, list(hints))}", key=dotted)
    setattr(section, name, _coerce(value, hints[name], dotted))


def _tracking_checks(t: TrainConfig) -> list[tuple[bool, str, str]]:
    """Early stopping and ``train.report_to``."""
    from promcse.training.callbacks import TRACKERS

    return [
        (t.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0 (0 = off)"),
        (t.early_stopping_patience == 0 or t.eval_every >= 0, "train.early_stopping_patience",
         "needs evaluations (train.eval_every >= 0)"),
        (all(n.strip() in ("", "none", *TRACKERS) for n in t.report_to.split(",")), "train.report_to",
         f"must name trackers among {', '.join(TRACKERS)} (comma-separated) or none"),
    ]


def validate(config: RunConfig) -> None:
    """Reject impossible combinations (before any model or data is loaded).

    The data-dependent rule (hard negatives present when the objective needs them) is checked by the
    training reader, also before any model loads.
    """
    # Imported here, not at the top: the choices live with the code that implements them, and those
    # modules load torch/transformers, which `promcse --help` should not wait for.
    from promcse.encoder.model import check_choices
    from promcse.objectives.objective import OBJECTIVES

    m, lo, t = config.model, config.loss, config.train
    check_choices(m.mode, m.pooler, m.head, m.prompt_length)
    checks = [
        (m.mode in ("prompt", "full"), "model.mode", "must be 'prompt' or 'full'"),
        (m.prompt_length >= 0, "model.prompt_length", "must be >= 0"),
        (m.prompt_projection_hidden >= 1, "model.prompt_projection_hidden", "must be >= 1"),
        (0.0 <= m.prompt_dropout < 1.0, "model.prompt_dropout", "must be in [0, 1)"),
        (m.prompt_init_std >= 0.0, "model.prompt_init_std", "must be >= 0"),
        (not (m.prompt_gate and m.shift_positions), "model.shift_positions",
         "model.prompt_gate needs shift_positions=false (a gated prompt starts as the backbone itself)"),
        (lo.name in OBJECTIVES, "loss.name", f"must be one of {', '.join(OBJECTIVES)}"),
        (lo.eh_weight >= 0.0, "loss.eh_weight", "must be >= 0"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (t.grad_clip >= 0.0, "train.grad_clip", "must be >= 0 (0 = off)"),
        (t.weight_decay >= 0.0, "train.weight_decay", "must be >= 0"),
        (config.data.dev == "stsb" or config.data.dev.removeprefix("retrieval:").partition(":")[0] != ""
         and config.data.dev.startswith("retrieval:"), "data.dev", "must be 'stsb' or 'retrieval:DIR[:SPLIT]'"),
        (config.data.max_length >= 2, "data.max_length", "must be >= 2 (the special tokens alone take 2)"),
        (lo.temperature > 0, "loss.temperature", "must be > 0"),
        (t.batch_size >= 2, "train.batch_size", "contrastive learning needs at least 2 rows per batch"),
        (t.lr > 0, "train.lr", "must be > 0"),
        (t.epochs >= 1, "train.epochs", "must be >= 1"),
        (t.max_steps >= 0, "train.max_steps", "must be >= 0"),
        (t.grad_cache_chunk >= 0, "train.grad_cache_chunk", "must be >= 0"),
        (t.save_every >= 0, "train.save_every", "must be >= 0"),
        (t.keep_states >= 1, "train.keep_states", "must be >= 1"),
        *_tracking_checks(t),
        (t.eval_every >= -1, "train.eval_every", "must be >= -1 (-1 = never, 0 = only at the end)"),
        (lo.tile_size >= 0, "loss.tile_size", "must be >= 0"),
        *_objective_checks(lo, OBJECTIVES),
        (t.precision in ("fp32", "bf16"), "train.precision", "must be fp32 or bf16"),
        (0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)"),
        (t.gate_lr >= 0.0, "train.gate_lr", "must be >= 0 (0 = train.lr)"),
        (t.gate_lr == 0.0 or m.prompt_gate, "train.gate_lr", "only applies to a gated prefix: set model.prompt_gate: true"),
        (t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda"),
    ]
    for ok, key, message in _finite_checks(config) + checks + _distill_and_source_checks(lo, config.data):
        if not ok:
            raise PromcseError(message, key=key)


def _finite_checks(config: RunConfig) -> list[tuple[bool, str, str]]:
    """Every float setting finite (also when a config was built in Python, not parsed): inf/nan never train."""
    values = [(f"{name}.{f.name}", getattr(section, f.name)) for name in ("model", "data", "loss", "train")
              for section in [getattr(config, name)] for f in dataclasses.fields(section)]
    values += [(f"data.sources[{i}].weight", s.weight) for i, s in enumerate(config.data.sources)]
    return [(math.isfinite(v), key, f"must be a finite number, got {v!r}") for key, v in values
            if isinstance(v, float)]


def _objective_checks(lo: LossConfig, objectives: dict[str, ObjectiveKind]) -> list[tuple[bool, str, str]]:
    """``(ok, key, message)`` rules that the chosen objective's registry entry sets."""
    kind = objectives.get(lo.name)
    if kind is None:
        return []
    tiled = ", ".join(n for n, k in objectives.items() if k.tiles)
    return [
        (lo.tile_size == 0 or kind.tiles, "loss.tile_size", f"tiling is for {tiled}; {lo.name} is dense"),
        (lo.hard_negative_weight == 0.0 or kind.bonus, "loss.hard_negative_weight",
         f"{lo.name} has no hard-negative bonus (its hard negatives only join the denominators)"),
    ]


def build_objective(loss: LossConfig) -> Objective:
    """The objective a ``loss`` config section describes (names checked by :func:`validate`)."""
    from promcse.objectives.objective import OBJECTIVES, Objective

    eh = OBJECTIVES[loss.name].eh
    return Objective(name=loss.name, temperature=loss.temperature, hard_negative_weight=loss.hard_negative_weight,
                     eh_weight=loss.eh_weight if eh else 0.0, eh_margin=loss.eh_margin, tile_size=loss.tile_size,
                     distill=loss.distill if loss.distill_teacher else "", distill_weight=loss.distill_weight,
                     distill_temperature=loss.distill_temperature)


def _distill_and_source_checks(lo: LossConfig, data: DataConfig) -> list[tuple[bool, str, str]]:
    """``(ok, key, message)`` rules for distillation and ``data.sources``."""
    from promcse.objectives.objective import DISTILL_LOSSES

    return [
        (lo.distill in DISTILL_LOSSES, "loss.distill", f"must be one of {', '.join(DISTILL_LOSSES)}"),
        (lo.distill_weight >= 0.0, "loss.distill_weight", "must be >= 0"),
        (lo.distill_temperature > 0, "loss.distill_temperature", "must be > 0"),
        (lo.name != "distill" or bool(lo.distill_teacher), "loss.distill_teacher", "loss.name=distill needs a teacher model"),
        (all(src.file for src in data.sources), "data.sources", "every source needs a file"),
        (all(src.weight > 0 for src in data.sources), "data.sources", "every weight must be > 0"),
        (all(src.contrastive for src in data.sources) or bool(lo.distill_teacher), "data.sources",
         "a source with contrastive: false needs loss.distill_teacher (it is trained by distillation only)"),
    ]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a run config from defaults, a YAML file, then ``section.key=value`` overrides.

    Raises:
        PromcseError: Unknown sections/keys, wrong types, malformed YAML or overrides, impossible combos.
    """
    config = RunConfig()
    if path is not None:
        from promcse.io.data import read_text

        try:
            raw = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            raise PromcseError(f"invalid YAML: {err}", path=path, line=None if line is None else line + 1) from None
        if not isinstance(raw, dict):
            raise PromcseError("the config must be a mapping of sections", path=path)
        for section_name, values in raw.items():
            if not isinstance(values, dict):
                raise PromcseError(f"section must be a mapping{_did_you_mean(str(section_name), list(SECTIONS))}", path=path, key=str(section_name))
            for name, value in values.items():
                try:
                    _set(config, f"{section_name}.{name}", value)
                except PromcseError as err:
                    raise PromcseError(err.message, path=path, key=err.key) from None
    for item in overrides or []:
        if "=" not in item:
            raise PromcseError(f"override '{item}' must look like section.key=value", key=item)
        key, value = item.split("=", 1)
        _set(config, key.strip(), yaml.safe_load(value) if value.strip() else "")
    validate(config)
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def describe() -> str:
    """Every key with its default and help, for ``--help`` epilogs and the README."""
    lines = []
    for section_name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            lines.append(f"  {section_name}.{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


__all__ = ["RunConfig", "ModelConfig", "DataConfig", "Source", "LossConfig", "TrainConfig", "load_config", "save_config"]
