"""``promcse_onnx.json``, the metadata of an ONNX export: its strict reader, the seal that the export puts on
its files, and the cross-check of a cached export against the model reference it was made from.

The export seals what it wrote (:func:`seal`): ``files`` records the size and sha256 of every file of the
directory (the graph, the tokenizer's files), and ``meta_sha256`` the digest of the metadata itself, so that
an edited ``max_length`` or normalisation entry is caught as surely as a swapped graph. Loading reads the
metadata strictly (:func:`read_meta`: every field's type and range, the cross-field rules), then checks the
files against their checksums (:func:`verify_files`) and the metadata against its digest (:func:`verify_digest`);
any failure is one :class:`promcse.errors.PromcseError` naming the file and the key. Exports written before
the seal (``format_version`` 1) are refused with a request to export again.

A cached export (``promcse.load(M, backend="onnx")``) is also compared with what ``M`` says about itself, read
from its config files only (:func:`cache_mismatch`): the cache key it was written under, its embedding size,
family, prompt, pooler and head settings and its token limit.

This module imports neither torch nor ONNX Runtime at import time (the runtime's encoder needs neither to
check an export).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError
from promcse.io.files import file_manifest, verify_manifest
from promcse.io.schema import read_versioned

FORMAT = "promcse-onnx"
FORMAT_VERSION = 2  # 2: the export's files are checksummed and the metadata digested (1: neither; refused)
META_FILE = "promcse_onnx.json"
GRAPH_FILES = {"none": "model.onnx", "int8": "model_int8.onnx"}
PRECISIONS = {"fp32": GRAPH_FILES["none"], "int8": GRAPH_FILES["int8"]}
OUTPUTS = ("embedding", "normalized_embedding")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
NORMALIZATION: dict[str, Any] = {"kind": "l2", "output": OUTPUTS[1], "raw_output": OUTPUTS[0], "default": True}
MODES = ("prompt", "full", "frozen")  # promcse.encoder.model.MODES (not imported: it pulls in torch)
HEAD_MODES = ("none", "train_only", "always")  # promcse.encoder.pooling.HEAD_MODES (likewise)
# Files the tokenizer may read: one of them present but not written by the export is refused.
TOKENIZER_FILES = ("added_tokens.json", "chat_template.jinja", "merges.txt", "sentencepiece.bpe.model",
                   "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer.model",
                   "tokenizer_config.json", "vocab.json", "vocab.txt")
TOP_KEYS = {"format", "format_version", "file", "precision", "opset", "inputs", "outputs", "multi_prompt", "dim",
            "normalization", "backbone", "prompt_ids", "prompts", "versions", "files", "meta_sha256", "cache_key"}
PROMPT_KEYS = {"name", "id", "source", "mode", "pooler", "head", "prompt_length", "shift_positions", "max_length"}
MAX_PROMPTS = 4096
SHA256 = re.compile(r"[0-9a-f]{64}")
_KINDS = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object"}


def _typed(value: Any, kind: type, key: str, lo: int | None = None, hi: int | None = None) -> Any:
    """``value`` of exactly type ``kind`` (a bool is no int) within [lo, hi]."""
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
    if not ok:
        raise PromcseError(f"expected {_KINDS[kind]}, got {json.dumps(value)[:60]}", key=key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise PromcseError(f"{value} is outside {lo}..{hi}", key=key)
    if kind is str and not value.strip():
        raise PromcseError("empty", key=key)
    return value


def _need(data: dict[str, Any], key: str, kind: type, where: str = "", **bounds: int) -> Any:
    """Required field ``key`` of ``data`` (see :func:`_typed`); its error key is ``where.key``."""
    name = f"{where}.{key}" if where else key
    if key not in data:
        raise PromcseError("missing", key=name)
    return _typed(data[key], kind, name, **bounds)


def _no_unknown(data: dict[str, Any], allowed: set[str], where: str = "") -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PromcseError(f"unknown key; expected some of {sorted(allowed)}",
                           key=f"{where}.{unknown[0]}" if where else unknown[0])


def plain_name(name: str) -> bool:
    """A file name inside the export directory: no folder part, not absolute, not ``.``/``..``."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and not os.path.isabs(name)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read ``promcse_onnx.json`` strictly: format and version, then every field's type, range and cross-field rule.

    Raises:
        PromcseError: Missing, not a regular file, not JSON, another format, an older or newer version, or any
            field wrong; naming the file and the key.
    """
    path = Path(directory) / META_FILE
    meta = read_versioned(path, FORMAT, FORMAT_VERSION, "ONNX export")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PromcseError(f"ONNX export written by an older promcse (format_version "
                           f"{json.dumps(meta.get('format_version'))}), without the checksums this version checks "
                           "before it trusts a graph: export the model again into this directory",
                           path=path, key="format_version")
    try:
        _check_fields(meta)
    except PromcseError as err:
        raise PromcseError(err.message, path=path, key=err.key) from None
    return meta


def _check_fields(meta: dict[str, Any]) -> None:
    """Every field of the metadata (see :func:`read_meta`); errors carry the key only."""
    _no_unknown(meta, TOP_KEYS)
    precision = _need(meta, "precision", str)
    if precision not in PRECISIONS:
        raise PromcseError(f"'{precision}' is not one of {', '.join(PRECISIONS)}", key="precision")
    graph = _need(meta, "file", str)
    if not plain_name(graph):
        raise PromcseError(f"'{graph}' is not a file name inside the export directory", key="file")
    if graph != PRECISIONS[precision]:
        raise PromcseError(f"the graph of a {precision} export is {PRECISIONS[precision]}, not '{graph}'", key="file")
    _need(meta, "opset", int, lo=7, hi=1000)
    _need(meta, "dim", int, lo=1, hi=65536)
    if _need(meta, "outputs", list) != list(OUTPUTS):
        raise PromcseError(f"the graph's outputs are {list(OUTPUTS)}", key="outputs")
    _check_normalization(_need(meta, "normalization", dict))
    backbone = _need(meta, "backbone", dict)
    _no_unknown(backbone, {"name", "model_type", "unit_output"}, "backbone")
    _need(backbone, "name", str, "backbone")
    _need(backbone, "model_type", str, "backbone")
    if "unit_output" in backbone:  # written since 0.2 (whether the pipeline ends in Normalize); absent: false
        _need(backbone, "unit_output", bool, "backbone")
    prompts = _check_prompts(_need(meta, "prompts", list))
    multi = _need(meta, "multi_prompt", bool)
    if multi != (len(prompts) > 1):
        raise PromcseError(f"must be {str(len(prompts) > 1).lower()} for {len(prompts)} prompt(s)", key="multi_prompt")
    _check_inputs(_need(meta, "inputs", list), multi)
    ids = {p["name"]: p["id"] for p in prompts}
    if _need(meta, "prompt_ids", dict) != ids:
        raise PromcseError(f"must map each prompt's name to its id: {json.dumps(ids)[:200]}", key="prompt_ids")
    for name, version in _need(meta, "versions", dict).items():
        _typed(version, str, f"versions.{name}")
    _check_files(_need(meta, "files", dict), graph)
    if not SHA256.fullmatch(_need(meta, "meta_sha256", str)):
        raise PromcseError("expected 64 lowercase hex digits (a sha256)", key="meta_sha256")
    if "cache_key" in meta:
        _typed(meta["cache_key"], str, "cache_key")


def _check_normalization(norm: dict[str, Any]) -> None:
    """The graph's outputs are fixed: ``normalized_embedding`` is the L2-normalised one, the default."""
    _no_unknown(norm, set(NORMALIZATION), "normalization")
    for key, want in NORMALIZATION.items():
        if _need(norm, key, type(want), "normalization") != want:
            raise PromcseError(f"expected {json.dumps(want)} (the graph's outputs are fixed)",
                               key=f"normalization.{key}")


def _check_prompts(prompts: list[Any]) -> list[dict[str, Any]]:
    """Each prompt entry typed and in range; ids are list positions, names unique."""
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise PromcseError(f"expected 1..{MAX_PROMPTS} prompts, got {len(prompts)}", key="prompts")
    for k, entry in enumerate(prompts):
        where = f"prompts[{k}]"
        _typed(entry, dict, where)
        _no_unknown(entry, PROMPT_KEYS, where)
        _need(entry, "name", str, where)
        if _need(entry, "id", int, where) != k:
            raise PromcseError(f"prompt ids are positions in this list: expected {k}", key=f"{where}.id")
        _need(entry, "source", str, where)
        for key, choices in (("mode", MODES), ("head", HEAD_MODES)):
            if _need(entry, key, str, where) not in choices:
                raise PromcseError(f"'{entry[key]}' is not one of {', '.join(choices)}", key=f"{where}.{key}")
        _need(entry, "pooler", str, where)
        length = _need(entry, "prompt_length", int, where, lo=0, hi=4096)
        if _need(entry, "shift_positions", bool, where) and not length:
            raise PromcseError("a prompt of length 0 shifts no positions", key=f"{where}.shift_positions")
        _need(entry, "max_length", int, where, lo=1, hi=1_000_000)
    names = [p["name"] for p in prompts]
    if len(set(names)) != len(names):
        raise PromcseError(f"prompt names must be unique: {names[:20]}", key="prompts")
    return prompts


def _check_inputs(inputs: list[Any], multi: bool) -> None:
    """Token inputs in :data:`TOKEN_INPUTS` order (``input_ids``, ``attention_mask`` first), then ``prompt_id``
    exactly when there are several prompts."""
    names = [_typed(name, str, f"inputs[{i}]") for i, name in enumerate(inputs)]
    tokens = [name for name in names if name != "prompt_id"]
    if tokens[:2] != list(TOKEN_INPUTS[:2]) or tokens != [n for n in TOKEN_INPUTS if n in tokens]:
        raise PromcseError(f"expected {list(TOKEN_INPUTS[:2])}, maybe {TOKEN_INPUTS[2]}, then prompt_id when there "
                           f"are several prompts; got {names[:10]}", key="inputs")
    if names != tokens + (["prompt_id"] if multi else []):
        raise PromcseError(f"prompt_id must be the last input exactly when multi_prompt is true; got {names[:10]}",
                           key="inputs")


def _check_files(files: dict[str, Any], graph: str) -> None:
    """``{name: {bytes, sha256}}`` of plain file names, the graph and the tokenizer's config among them."""
    for name, entry in files.items():
        where = f"files.{name}"
        if not plain_name(name) or name == META_FILE:
            raise PromcseError(f"'{name}' is not a file name inside the export directory", key="files")
        _typed(entry, dict, where)
        _no_unknown(entry, {"bytes", "sha256"}, where)
        _need(entry, "bytes", int, where, lo=0, hi=2**50)
        if not SHA256.fullmatch(_need(entry, "sha256", str, where)):
            raise PromcseError("expected 64 lowercase hex digits (a sha256)", key=f"{where}.sha256")
    for name in (graph, "tokenizer_config.json"):
        if name not in files:
            raise PromcseError(f"does not list {name}, which the export writes", key="files")


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of the metadata less its ``meta_sha256`` (canonical JSON: sorted keys, no spaces, ASCII)."""
    body = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def seal(meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``meta`` with ``files`` (size and sha256 of every file in ``directory`` but the metadata) and its digest."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != META_FILE)
    sealed = {**meta, "files": file_manifest(directory, names)}
    sealed["meta_sha256"] = meta_digest(sealed)
    return sealed


def verify_files(directory: str | Path, meta: dict[str, Any]) -> None:
    """Every file ``meta`` lists is there, a regular file, of its recorded size and sha256; no tokenizer file is
    there that the export did not write.

    Every file is hashed on every load, the graph included: ONNX Runtime reads the whole graph anyway, so this
    costs about one more read of it (all-MiniLM-L6-v2's fp32 graph, 86 MiB: ~0.05 s to hash), and it is what lets
    the cache and a copied export be trusted.

    Raises:
        PromcseError: Naming the file that is missing, not a regular file, truncated, changed or not listed.
    """
    root = Path(directory)
    verify_manifest(root, meta["files"], [meta["file"]], root / META_FILE)
    foreign = [name for name in TOKENIZER_FILES if name not in meta["files"] and os.path.lexists(root / name)]
    if foreign:
        raise PromcseError(f"not written by the export ({META_FILE} does not list it), yet the tokenizer would read "
                           "it: remove it, or export the model again", path=root / foreign[0])


def verify_digest(directory: str | Path, meta: dict[str, Any]) -> None:
    """The metadata is what the export wrote (its ``meta_sha256``).

    Raises:
        PromcseError: The file was edited after the export.
    """
    if meta_digest(meta) != meta["meta_sha256"]:
        raise PromcseError("changed after the export wrote it (its content no longer matches its digest): export "
                           "the model again rather than editing this file", path=Path(directory) / META_FILE,
                           key="meta_sha256")


def _config_facts(name: str) -> dict[str, Any]:
    """Embedding size, family and position limit from a local (or already downloaded) transformers config; empty
    when there is none to read: the facts are then unknown, not wrong, and nothing is fetched."""
    from transformers import AutoConfig

    from promcse.encoder.backbone import position_limit, shape_of

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
        shape = shape_of(config)
        return {"dim": shape.hidden_size, "model_type": shape.model_type, "position_limit": position_limit(config)}
    except Exception:  # noqa: BLE001 - transformers raises many kinds; any of them means "unknown"
        return {}


def reference_facts(model_ref: str) -> dict[str, Any]:
    """What the torch encoder of ``model_ref`` will be, from config files alone (no weights are read).

    A promcse checkpoint's spec gives every prompt setting (mode, pooler, head, prompt length, position shift)
    and its backbone's config the position limit; for other references (``minilm``, HF names and directories,
    released checkpoints, whose pooler may come from the caller) only the backbone's facts are known.
    """
    from promcse.encoder.backbone import resolve_backbone
    from promcse.models.checkpoint import BACKBONE_DIR, is_checkpoint, read_spec

    path = Path(resolve_backbone(model_ref))
    if not is_checkpoint(path):
        return _config_facts(str(path))
    spec = read_spec(path)
    backbone = str(path / BACKBONE_DIR) if spec.mode == "full" else resolve_backbone(spec.backbone)
    facts = {key: value for key, value in _config_facts(backbone).items() if key == "position_limit"}
    prompt = spec.prompt
    return {**facts, "dim": spec.shape.hidden_size, "model_type": spec.shape.model_type, "mode": spec.mode,
            "pooler": spec.pooler, "head": spec.head, "prompt_length": prompt.length if prompt is not None else 0,
            "shift_positions": bool(prompt is not None and prompt.shift_positions)}


def cache_mismatch(meta: dict[str, Any], model_ref: str, key: str) -> str | None:
    """Why the cached export ``meta`` (read and verified) cannot stand for ``model_ref``; None when it can.

    It must have been written under ``key`` (so no other entry was copied in its place), hold one prompt, and
    agree with :func:`reference_facts`: embedding size, family, prompt settings and token limit.
    """
    if meta.get("cache_key") != key:
        return f"it was written under cache key {json.dumps(meta.get('cache_key'))}, not {key}"
    if len(meta["prompts"]) != 1:
        return f"it holds {len(meta['prompts'])} prompts where a cached export holds one"
    if "unit_output" not in meta["backbone"]:
        return "it was written before exports recorded whether the model's output is unit length"
    prompt = meta["prompts"][0]
    recorded = {**prompt, "dim": meta["dim"], "model_type": meta["backbone"]["model_type"]}
    facts = reference_facts(model_ref)
    limit = facts.pop("position_limit", None)
    for name, want in facts.items():
        if recorded[name] != want:
            return f"its {name} is {json.dumps(recorded[name])} but {model_ref} has {json.dumps(want)}"
    shift = prompt["prompt_length"] if prompt["shift_positions"] else 0
    if limit is not None and prompt["max_length"] != limit - shift:
        return f"its max_length is {prompt['max_length']} but {model_ref} takes at most {limit - shift} tokens"
    return None
