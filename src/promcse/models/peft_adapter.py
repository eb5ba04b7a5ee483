"""Reading a PEFT prefix-tuning adapter directory as a promcse encoder (:func:`load_peft_adapter`).

PEFT (``peft.PrefixTuningConfig``, ``save_pretrained``) writes ``adapter_config.json`` and
``adapter_model.safetensors``, whose one tensor ``prompt_embeddings`` is the (P, L*2*H) key/value table in the
layout promcse's :class:`promcse.encoder.prompt.DeepPrompt` uses (P-tuning v2's, which both follow). With
``prefix_projection`` PEFT saves the table its MLP produced, not the MLP, so both kinds read the same way.

What PEFT computes, and so what the encoder built here computes: the prefix is passed to the base model as a
key/value cache, so transformers starts the real tokens' position ids at P (promcse's ``shift_positions``;
PEFT offsets any ``position_ids`` it is given by P too); the attention mask gets P leading ones; the prefix
has no dropout. PEFT records no pooling: promcse pools by the mean over the real tokens (sentence-transformers'
setting for MiniLM), unless the caller names another pooler.

The reader needs neither PEFT nor its model classes: only JSON and safetensors are read, strictly, before
the backbone (``base_model_name_or_path``, resolved as every promcse backbone: ``minilm``, a local directory
or a hub name) is loaded. Nothing is unpickled: an adapter saved as ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.encoder.backbone import check_prompt_support, shape_of
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.encoder.pooling import POOLERS
from promcse.encoder.prompt import PromptSpec
from promcse.errors import PromcseError
from promcse.io.schema import MAX_PROMPT_ELEMENTS, read_json_object, safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
WEIGHT_KEY = "prompt_embeddings"  # PEFT's name for a prompt-learning adapter's one tensor
PEFT_TYPE = "PREFIX_TUNING"
TASK_TYPE = "FEATURE_EXTRACTION"
INSTALL_HINT = 'pip install "promcse[peft]"'

BackboneSource = Callable[[str], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def is_peft_adapter(path: str | Path) -> bool:
    """True if ``path`` is a directory holding ``adapter_config.json`` (any PEFT adapter; :func:`read_adapter_config`
    refuses the kinds promcse cannot read)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _field(config: dict[str, Any], key: str, kind: type, path: Path, lo: int | None = None) -> Any:
    """``config[key]`` of exactly ``kind`` (a bool is never an int), at least ``lo``."""
    value = config.get(key)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok or (lo is not None and value < lo):
        wanted = f"an integer >= {lo}" if kind is int else f"a {kind.__name__}"
        raise PromcseError(f"expected {wanted}, got {value!r}", path=path, key=key)
    return value


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The facts of a PEFT prefix-tuning adapter's ``adapter_config.json``, checked.

    Returns:
        ``base_model``, ``length`` (num_virtual_tokens), ``num_layers``, ``num_heads``, ``hidden_size`` (token_dim).

    Raises:
        PromcseError: Naming the file and the field: another adapter kind (``peft_type``, e.g. LORA), another task,
            an encoder-decoder prefix, ``modules_to_save``, a pinned ``revision``, a missing or mistyped field.
    """
    path = Path(directory) / ADAPTER_CONFIG
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise PromcseError(f"a PEFT {peft_type} adapter: promcse reads prefix-tuning adapters only (peft_type "
                           f"{PEFT_TYPE}), whose prefix is its deep prompt", path=path, key="peft_type")
    if config.get("task_type") not in (TASK_TYPE, None):
        raise PromcseError(f"task_type {config.get('task_type')!r}: promcse reads {TASK_TYPE} adapters (an encoder "
                           "that gives hidden states to pool)", path=path, key="task_type")
    if config.get("num_transformer_submodules") not in (1, None):
        raise PromcseError("an encoder-decoder prefix (one per submodule); promcse's encoders have one stack",
                           path=path, key="num_transformer_submodules")
    if config.get("modules_to_save"):
        raise PromcseError("the adapter trains base-model modules too (modules_to_save), which a prefix cannot "
                           "carry", path=path, key="modules_to_save")
    if config.get("revision") not in (None, "main"):
        raise PromcseError(f"pins base-model revision {config['revision']!r}; promcse loads a backbone's default "
                           "revision only", path=path, key="revision")
    base = _field(config, "base_model_name_or_path", str, path)
    if not base.strip():
        raise PromcseError("empty base model", path=path, key="base_model_name_or_path")
    return {"base_model": base, "length": _field(config, "num_virtual_tokens", int, path, lo=1),
            "num_layers": _field(config, "num_layers", int, path, lo=1),
            "num_heads": _field(config, "num_attention_heads", int, path, lo=1),
            "hidden_size": _field(config, "token_dim", int, path, lo=1)}


def read_prefix_table(directory: str | Path, facts: dict[str, Any]) -> torch.Tensor:
    """The (P, L*2*H) ``prompt_embeddings`` table, as fp32, its name, shape and values checked.

    Raises:
        PromcseError: A missing or pickled weights file, other tensors, a shape the config does not imply, a table
            too large to hold, NaN or infinite values.
    """
    root = Path(directory)
    path = root / ADAPTER_WEIGHTS
    if not os.path.lexists(path):
        pickled = (root / PICKLED_WEIGHTS).exists()
        why = (f"only {PICKLED_WEIGHTS}, which promcse never unpickles (re-save the adapter with "
               "safe_serialization=True)") if pickled else "no adapter weights"
        raise PromcseError(why, path=path)
    width = facts["num_layers"] * 2 * facts["hidden_size"]
    if facts["length"] * width > MAX_PROMPT_ELEMENTS:
        raise PromcseError(f"a prefix of {facts['length']} tokens this wide would not fit in memory",
                           path=root / ADAPTER_CONFIG, key="num_virtual_tokens")
    header = safetensors_header(path)
    if set(header) != {WEIGHT_KEY}:
        raise PromcseError(f"expected the one tensor '{WEIGHT_KEY}', found {sorted(header)}", path=path)
    if header[WEIGHT_KEY][1] != (facts["length"], width):
        raise PromcseError(f"tensor '{WEIGHT_KEY}' has shape {header[WEIGHT_KEY][1]}, adapter_config.json implies "
                           f"({facts['length']}, {width})", path=path)
    try:
        table = safetensors.torch.load_file(str(path))[WEIGHT_KEY].float()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged data
        raise PromcseError(f"cannot read the tensors: {str(err).splitlines()[0]}", path=path) from None
    if not bool(torch.isfinite(table).all()):
        raise PromcseError(f"tensor '{WEIGHT_KEY}' holds NaN or infinite values", path=path)
    return table


def check_backbone_fits(facts: dict[str, Any], backbone: PreTrainedModel, path: Path) -> None:
    """Refuse an adapter made for a backbone of other layers, heads or width (named by its config field)."""
    shape = shape_of(backbone.config)
    for key, ours, theirs in (("num_layers", "num_layers", shape.num_layers),
                              ("num_attention_heads", "num_heads", shape.num_heads),
                              ("token_dim", "hidden_size", shape.hidden_size)):
        if facts[ours] != theirs:
            raise PromcseError(f"{facts[ours]} differs from the base model's {theirs} ('{facts['base_model']}')",
                               path=path, key=key)


def load_peft_adapter(directory: str | Path, backbones: BackboneSource, pooler: str | None = None,
                      prompt_length: int | None = None) -> SentenceEncoder:
    """A :class:`SentenceEncoder` computing what PEFT's ``PeftModel`` of this adapter computes, pooled.

    Args:
        directory: The adapter directory.
        backbones: Loads a backbone by name (``promcse.encoder.backbone.load_backbone``, or a shared cache); it is
            given ``base_model_name_or_path``, so a caller can map that name to another copy of the same model.
        pooler: A key of :data:`promcse.encoder.pooling.POOLERS` (default ``avg``: the mean over real tokens).
        prompt_length: When given, checked against ``num_virtual_tokens``.

    Raises:
        PromcseError: See :func:`read_adapter_config`, :func:`read_prefix_table` and :func:`check_backbone_fits`.
    """
    root = Path(directory)
    facts = read_adapter_config(root)
    if prompt_length is not None and prompt_length != facts["length"]:
        raise PromcseError(f"prompt_length={prompt_length} given, but the adapter has num_virtual_tokens "
                           f"{facts['length']}", path=root / ADAPTER_CONFIG, key="prompt_length")
    if pooler is not None and pooler not in POOLERS:
        raise PromcseError(f"unknown pooler '{pooler}'; choose one of {', '.join(POOLERS)}", key="pooler")
    table = read_prefix_table(root, facts)
    backbone, tokenizer = backbones(facts["base_model"])
    check_backbone_fits(facts, backbone, root / ADAPTER_CONFIG)
    shape = shape_of(backbone.config)
    try:
        check_prompt_support(shape.model_type)
    except PromcseError as err:
        raise PromcseError(err.message, path=root / ADAPTER_CONFIG, key="base_model_name_or_path") from None
    prompt = PromptSpec.for_backbone(shape, facts["length"], dropout=0.0, shift_positions=True)
    spec = EncoderSpec(backbone=facts["base_model"], shape=shape, mode="prompt", prompt=prompt,
                       pooler=pooler or "avg", head="none", extra={"source": "peft"})
    encoder = build_encoder(spec, backbone, tokenizer)
    with torch.no_grad():
        encoder.prompt.embedding.weight.copy_(table)  # type: ignore[union-attr]
    return encoder.eval()
