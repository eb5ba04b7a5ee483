"""Encoding with ONNX Runtime: :class:`OnnxEncoder` over an export of :mod:`promcse.models.onnx_graph`.

``promcse.load(M, backend="onnx")`` lands here (:func:`load_onnx`): an export directory is opened as it is;
any other model reference (checkpoint, ``minilm``, HF name or path) is exported once into a cache folder,
``$PROMCSE_CACHE_DIR/onnx/<hash>`` (default ``~/.cache/promcse/onnx/<hash>``, or under ``$XDG_CACHE_HOME``),
keyed by the reference, the size and modification time of its files (and of its backbone's), the
quantisation and the library versions, so that a changed checkpoint is exported again.

Nothing on disk is trusted as it is (:mod:`promcse.models.onnx_meta`): every load reads the metadata strictly,
checks every file against the checksums the export recorded, the graph's inputs and outputs against the
metadata and the metadata against its digest. A user's export directory that fails is refused with a
:class:`promcse.errors.PromcseError` naming the file; a cache entry that fails, or disagrees with the model
reference it stands for, is exported again with a warning saying why.

:class:`OnnxEncoder` has the encoder API the rest of promcse uses (``encode``, ``similarity``, ``dim``,
``max_length``, ``tokenizer``): texts are tokenized once, sorted by token count, padded per batch and run
through the graph; in a multi-prompt export each text may name its own prompt, and one batch mixes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from promcse.errors import PromcseError
from promcse.models.onnx_meta import (FORMAT, FORMAT_VERSION, META_FILE, cache_mismatch, read_meta, verify_digest,
                                      verify_files)

if TYPE_CHECKING:  # torch is imported only when encode shapes its output
    from promcse.encoder.outputs import Embeddings


__all__ = ["BACKENDS", "FORMAT", "FORMAT_VERSION", "META_FILE", "OnnxEncoder", "cache_key", "cache_root",
           "check_device", "is_onnx_export", "load_onnx", "make_session", "read_meta"]
BACKENDS: tuple[str, ...] = ("torch", "onnx")


def is_onnx_export(path: str | Path) -> bool:
    """True if ``path`` is a directory holding ``promcse_onnx.json``, whatever that file holds: a damaged export
    is reported by :func:`promcse.models.onnx_meta.read_meta`, never taken for a model to export."""
    try:
        return Path(path).is_dir() and os.path.lexists(Path(path) / META_FILE)
    except (OSError, ValueError):
        return False


def _runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise PromcseError("the ONNX backend needs onnxruntime: pip install 'promcse[onnx]'") from None
    return onnxruntime


def check_device(device: str) -> None:
    """The ONNX backend runs on the CPU: ``auto`` or ``cpu`` only.

    Raises:
        PromcseError: Any other device.
    """
    if device not in ("auto", "cpu"):
        raise PromcseError(f"the ONNX backend runs on the CPU; device '{device}' is not available to it "
                           "(use device 'cpu', or the torch backend)", key="device")


def make_session(graph: Path, threads: int = 0, device: str = "auto", spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session (``threads`` intra-op threads; 0: ONNX Runtime's default, one per core).

    ``spinning=False`` stops the intra-op threads from busy-waiting for work between and inside runs (ONNX
    Runtime's ``session.intra_op.allow_spinning``): what a server wants, where the event loop, tokenizer and
    response threads need those cores between graph runs (measured on the 2-core box, 1-text requests from 32
    clients: 476 and 480 texts/s without spinning, 449 and 365 with; 2.9 vs 3.6-4.3 CPU ms per text).
    """
    check_device(device)
    ort = _runtime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ONNX Runtime's errors (InvalidProtobuf, Fail, ...) share no base
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise PromcseError(f"ONNX Runtime cannot load this graph: {reason}", path=graph) from None


def check_graph(session: Any, meta: dict[str, Any], directory: Path) -> None:
    """The graph's inputs, outputs and embedding size are the ones ``promcse_onnx.json`` records.

    Raises:
        PromcseError: Naming the metadata file and the key that disagrees with the graph.
    """
    path = directory / META_FILE
    inputs = [node.name for node in session.get_inputs()]
    if inputs != meta["inputs"]:
        raise PromcseError(f"lists inputs {meta['inputs']} but the graph {meta['file']} takes {inputs}",
                           path=path, key="inputs")
    outputs = session.get_outputs()
    if [node.name for node in outputs] != meta["outputs"]:
        raise PromcseError(f"lists outputs {meta['outputs']} but the graph {meta['file']} gives "
                           f"{[node.name for node in outputs]}", path=path, key="outputs")
    size = outputs[0].shape[-1] if outputs[0].shape else None
    if isinstance(size, int) and size != meta["dim"]:
        raise PromcseError(f"says {meta['dim']} but the graph {meta['file']} gives {size}-dimensional embeddings",
                           path=path, key="dim")


def load_tokenizer(directory: Path) -> Any:
    """The export's tokenizer (its files already checked against their checksums).

    Raises:
        PromcseError: transformers cannot read them.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # noqa: BLE001 - tokenizers and transformers raise many kinds
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise PromcseError(f"cannot read the tokenizer's files: {reason}", path=directory) from None


class OnnxEncoder:
    """Sentence encoder over an ONNX export (one graph, one or several prompts).

    Args:
        directory: The export directory.
        prompt: The prompt used when ``encode`` names none (default: the first, id 0).
        threads: ONNX Runtime intra-op threads (0: its default).
        device: ``auto`` or ``cpu``.

    Raises:
        PromcseError: Not an export, or a damaged or edited one (see :mod:`promcse.models.onnx_meta`), an unknown
            prompt, onnxruntime missing, or a non-CPU device.
    """

    def __init__(self, directory: str | Path, prompt: str | None = None, threads: int = 0,
                 device: str = "auto") -> None:
        check_device(device)
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        verify_files(self.directory, self.meta)  # hashes the graph on every load: see verify_files
        self.prompts: dict[str, dict[str, Any]] = {p["name"]: p for p in self.meta["prompts"]}
        self.prompt = self._check_prompt(prompt or self.meta["prompts"][0]["name"])
        self.session = make_session(self.directory / self.meta["file"], threads, device)
        check_graph(self.session, self.meta, self.directory)
        verify_digest(self.directory, self.meta)  # after the field-by-field checks, whose messages say more
        self.tokenizer = load_tokenizer(self.directory)

    def _check_prompt(self, name: str) -> str:
        if name not in self.prompts:
            raise PromcseError(f"unknown prompt '{name}'; this ONNX export has: {', '.join(self.prompts)}",
                               path=self.directory, key="prompt")
        return name

    @property
    def names(self) -> list[str]:
        """Prompt names in prompt-id order."""
        return list(self.prompts)

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.meta["dim"])

    @property
    def max_length(self) -> int:
        """Longest real-token input of the default prompt (the position limit less its shift)."""
        return int(self.prompts[self.prompt]["max_length"])

    @property
    def token_inputs(self) -> list[str]:
        """The graph's token inputs (``input_ids``, ``attention_mask``, maybe ``token_type_ids``)."""
        return [name for name in self.meta["inputs"] if name != "prompt_id"]

    @property
    def precision(self) -> str:
        """``fp32`` or ``int8``."""
        return str(self.meta["precision"])

    def prompt_ids(self, prompt: str | Sequence[str] | None, count: int) -> np.ndarray:
        """(count,) int64 prompt ids: one prompt for every text, or one name per text."""
        if prompt is None or isinstance(prompt, str):
            return np.full(count, self.prompts[self._check_prompt(prompt or self.prompt)]["id"], dtype=np.int64)
        if len(prompt) != count:
            raise PromcseError(f"{count} texts but {len(prompt)} prompt names", key="prompt")
        return np.asarray([self.prompts[self._check_prompt(p)]["id"] for p in prompt], dtype=np.int64)

    def _tokenize(self, texts: Sequence[str], ids: np.ndarray, max_length: int | None) -> dict[str, list[list[int]]]:
        """Tokenize every text under its own prompt's position limit (truncations counted and reported)."""
        limits = {p["id"]: p["max_length"] for p in self.prompts.values()}
        merged: dict[str, list[list[int]]] = {}
        cut = 0
        for k in np.unique(ids).tolist():
            rows = np.flatnonzero(ids == k)
            limit = min(max_length or limits[k], limits[k])
            tokens = self.tokenizer([texts[i] for i in rows], truncation=True, max_length=limit, padding=False)
            cut += sum(len(t) >= limit for t in tokens["input_ids"])
            for key in self.token_inputs:
                column = merged.setdefault(key, [[] for _ in texts])
                values = tokens[key] if key in tokens else [[0] * len(t) for t in tokens["input_ids"]]
                for i, value in zip(rows.tolist(), values):
                    column[i] = value
        if cut:
            warnings.warn(f"{cut} of {len(texts)} texts reached their token limit and were truncated", stacklevel=3)
        return merged

    def _run(self, tokens: dict[str, list[list[int]]], rows: np.ndarray, ids: np.ndarray, output: str) -> np.ndarray:
        """One padded batch through the graph."""
        features = {key: [values[i] for i in rows] for key, values in tokens.items()}
        batch = self.tokenizer.pad(features, padding=True, return_tensors="np")
        feed = {key: np.asarray(batch[key], dtype=np.int64) for key in tokens}
        if self.meta["multi_prompt"]:
            feed["prompt_id"] = ids[rows]
        return self.session.run([output], feed)[0]

    @property
    def unit_output(self) -> bool:
        """Whether the exported model's pipeline ends in L2 normalisation (recorded at export; see
        :attr:`promcse.encoder.model.SentenceEncoder.unit_output`)."""
        return bool(self.meta["backbone"].get("unit_output", False))

    def encode(self, sentences: str | Sequence[str], batch_size: int = 64, show_progress_bar: bool | None = None,
               precision: str = "float32", convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, truncate_dim: int | None = None, max_length: int | None = None,
               prompt: str | Sequence[str] | None = None, **aliases: Any) -> Embeddings:
        """Encode texts with the same arguments, defaults and return shapes as
        :meth:`promcse.encoder.model.SentenceEncoder.encode` (sentence-transformers' ``encode``).

        Args:
            sentences: A text or a list of texts.
            batch_size: Texts per graph run.
            show_progress_bar: Show a tqdm bar (None: no bar).
            precision: ``float32``, ``int8``, ``uint8``, ``binary`` or ``ubinary`` (of the returned vectors; the
                graph's own weight precision is the export's).
            convert_to_numpy: One numpy array (False: a list of tensors).
            convert_to_tensor: One torch tensor.
            normalize_embeddings: L2-normalise the returned vectors.
            truncate_dim: Keep the first this-many dimensions.
            max_length: Truncate inputs at this many tokens (default: each prompt's position limit).
            prompt: A prompt name for all texts, or one per text (default: :attr:`prompt`).
            **aliases: ``normalize``, ``show_progress``, ``output``: promcse's older names (see
                :func:`promcse.encoder.outputs.encode_options`).
        """
        from promcse.encoder.outputs import check_batch_size, check_texts, encode_options, finish

        texts, single = check_texts(sentences)
        check_batch_size(batch_size)
        options, show = encode_options(aliases, normalize_embeddings=normalize_embeddings, truncate_dim=truncate_dim,
                                       precision=precision, convert_to_numpy=convert_to_numpy,
                                       convert_to_tensor=convert_to_tensor, show_progress_bar=show_progress_bar)
        return finish(self.raw_vectors(texts, batch_size, prompt, show, max_length), self.unit_output, options, single)

    def raw_vectors(self, texts: list[str], batch_size: int = 64, prompt: str | Sequence[str] | None = None,
                    show_progress: bool = False, max_length: int | None = None) -> np.ndarray:
        """The graph's un-normalised (N, D) float32 vectors in input order."""
        from tqdm.auto import tqdm

        from promcse.encoder.encode import token_length_order

        ids = self.prompt_ids(prompt, len(texts))
        result = np.empty((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return result
        tokens = self._tokenize(list(texts), ids, max_length)
        order = token_length_order(tokens)
        output = self.meta["normalization"]["raw_output"]
        for start in tqdm(range(0, len(texts), batch_size), disable=not show_progress, desc="encode", unit="batch"):
            rows = order[start : start + batch_size]
            result[rows] = self._run(tokens, rows, ids, output)
        return result

    def similarity(self, a: Any, b: Any, batch_size: int = 64,
                   prompt: str | Sequence[str] | None = None) -> np.ndarray:
        """Cosine similarity matrix (len(a), len(b)), float32, of two lists of texts or two embedding matrices."""
        from promcse.encoder.encode import cosine_matrix, is_embeddings

        if is_embeddings(a) and is_embeddings(b):
            return cosine_matrix(np.atleast_2d(np.asarray(a)), np.atleast_2d(np.asarray(b))).astype(np.float32)

        va = self.encode(a, batch_size=batch_size, normalize=False, prompt=prompt)
        vb = self.encode(b, batch_size=batch_size, normalize=False, prompt=prompt)
        return cosine_matrix(va, vb).astype(np.float32)


def cache_root() -> Path:
    """``$PROMCSE_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/promcse/onnx``, else ``~/.cache/promcse/onnx``."""
    from promcse.io.files import cache_home

    return cache_home() / "onnx"


def _file_facts(path: Path) -> list[Any]:
    """(name, size, mtime_ns) of every file under a directory (a file: itself; a hub name: nothing)."""
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(model_ref: str, quantize: str = "none", options: dict[str, Any] | None = None) -> str:
    """Hash naming the cached export of ``model_ref`` (see the module docstring); ``options``: the loader's own
    choices that change the vectors (a released checkpoint's ``pooler``, ``prompt_length``), part of the key."""
    import torch
    import transformers

    from promcse.version import __version__
    from promcse.encoder.backbone import resolve_backbone
    from promcse.models.checkpoint import is_checkpoint, read_spec

    path = Path(resolve_backbone(model_ref))
    parts: dict[str, Any] = {"ref": str(path.resolve()) if path.exists() else model_ref, "files": _file_facts(path),
                             "quantize": quantize, "format_version": FORMAT_VERSION, "promcse": __version__,
                             "torch": torch.__version__, "transformers": transformers.__version__,
                             "options": {k: v for k, v in sorted((options or {}).items()) if v is not None}}
    if is_checkpoint(path):
        backbone = Path(resolve_backbone(read_spec(path).backbone))
        parts["backbone"] = [str(backbone.resolve()) if backbone.exists() else str(backbone), _file_facts(backbone)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def load_onnx(model_ref: str, load_torch: Callable[[str], Any], quantize: str = "none", device: str = "auto",
              threads: int = 0, options: dict[str, Any] | None = None) -> OnnxEncoder:
    """An :class:`OnnxEncoder` for any model reference: an export as it is, anything else exported once and cached.

    An export directory is verified (:mod:`promcse.models.onnx_meta`) and refused when it fails. A cache entry
    that fails, or that disagrees with ``model_ref`` (:func:`promcse.models.onnx_meta.cache_mismatch`), is never
    used: it is exported again, with a warning saying why.

    Args:
        model_ref: An ONNX export directory, or what :func:`promcse.load` accepts.
        load_torch: Loads the torch encoder of a reference on the CPU (for the one-time export).
        quantize: ``none`` or ``int8`` for the cached export.
        device: ``auto`` or ``cpu``.
        threads: ONNX Runtime intra-op threads (0: its default).
        options: What ``load_torch`` was told beyond the reference (pooler, prompt length): part of the cache key,
            so a released checkpoint loaded with another pooler is exported again, not served from another's entry.
    """
    if is_onnx_export(model_ref):
        return OnnxEncoder(model_ref, threads=threads, device=device)
    check_device(device)  # fail before a slow load and export
    _runtime()
    key = cache_key(model_ref, quantize, options)
    target = cache_root() / key
    if os.path.lexists(target):
        cached = _open_cached(target, model_ref, key, threads, device)
        if cached is not None:
            return cached
    from promcse.models.onnx_graph import export_encoders

    name = Path(model_ref).name or model_ref
    try:
        export_encoders([load_torch(model_ref)], [name], target, quantize=quantize, sources=[model_ref], cache_key=key)
    except OSError:
        if not is_onnx_export(target):  # another process may have finished the same export first
            raise
    return OnnxEncoder(target, threads=threads, device=device)


def _open_cached(target: Path, model_ref: str, key: str, threads: int, device: str) -> OnnxEncoder | None:
    """The cache entry, verified and matching ``model_ref``; else None, the entry removed, after a warning."""
    problem: str | None
    try:
        encoder = OnnxEncoder(target, threads=threads, device=device)
    except PromcseError as err:
        problem = str(err)
    else:
        problem = cache_mismatch(encoder.meta, model_ref, key)
    if problem is None:
        return encoder
    warnings.warn(f"the cached ONNX export of {model_ref} at {target} is exported again: {problem}", stacklevel=3)
    _discard(target)
    return None


def _discard(target: Path) -> None:
    """Move a bad cache entry aside (one atomic rename, so no reader sees half of it) and delete it."""
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.bad")
    try:
        os.replace(target, aside)
    except OSError:
        return  # another process moved it first
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
