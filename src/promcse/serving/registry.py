"""Many prompts over one backbone: load several models so that each distinct backbone exists once in memory.

A prompt checkpoint is ~0.1-1 MB while its backbone is 90 MB-1.4 GB. :class:`PromptRegistry` loads every
checkpoint that names the same backbone (same resolved directory or hub name) onto one shared backbone
module object; :class:`promcse.encoder.model.SentenceEncoder` passes its own prompt to that backbone on every forward
call, so the encoders do not interfere. Bare backbones (``minilm``, an HF name) are registered the same way,
as a frozen encoder with mean pooling. Full fine-tunes and released PromCSE checkpoints (see
:mod:`promcse.models.released`; their pooler comes from ``promcse.json``) carry their own backbone and are not shared.

A role pair (:mod:`promcse.models.roles`) added as ``NAME`` is one listed model whose two roles are registered as
the internal entries ``NAME#query`` and ``NAME#document`` (:meth:`PromptRegistry.entry` maps a name and an
``input_type`` to one): encoders over the shared backbone like any other prompt, so rows of both roles and of
every other prompt on that backbone share forward passes. ``NAME`` alone means its document role
(:data:`DEFAULT_ROLE`).

Calls through the registry are serialised by one lock: the backbone's ``train``/``eval`` flag is shared
state, and on CPU one forward already uses every core.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.encoder.backbone import load_backbone, resolve_device
from promcse.encoder.encode import similarity, unit_rows
from promcse.errors import PromcseError
from promcse.models.loading import backbone_key, load, reference_key
from promcse.encoder.model import SentenceEncoder
from promcse.encoder.multiprompt import PromptBank, build_bank, encode_bank
from promcse.models.roles import ROLES, RoleEncoder
from promcse.serving.onnx_rows import OnnxRows

DEFAULT_ROLE = "document"  # what a role pair's name alone, and a request without input_type, means


class PromptRegistry:
    """Named encoders sharing their backbones.

    Args:
        device: ``auto``, ``cpu``, ``cuda``... where every encoder runs.

    Example:
        >>> registry = load_many({"news": "runs/news", "legal": "runs/legal"})  # doctest: +SKIP
        >>> registry.encode(["a headline"], model="news")  # doctest: +SKIP
    """

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.lock = threading.RLock()
        self._encoders: dict[str, SentenceEncoder] = {}
        self._refs: dict[str, str] = {}  # listed name -> reference (role pairs once, not their entries)
        self._roles: dict[str, RoleEncoder] = {}
        self._backbones: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
        # (backbone module id, gated) -> bank, name -> row
        self._banks: dict[tuple[int, bool], tuple[PromptBank, dict[str, int]]] = {}
        # the server's ONNX backend (serving.onnx_rows.OnnxRows), None: every row on torch
        self.onnx: OnnxRows | None = None

    def __contains__(self, name: object) -> bool:
        return name in self._refs

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def names(self) -> list[str]:
        """Registered model names in insertion order (a role pair once, under the name it was added as)."""
        return list(self._refs)

    @property
    def backbones(self) -> dict[str, PreTrainedModel]:
        """Distinct backbone modules by key (see :func:`backbone_key`); full fine-tunes are not listed."""
        return {key: pair[0] for key, pair in self._backbones.items()}

    def reference(self, name: str) -> str:
        """The model reference ``name`` was loaded from."""
        self.get(name)
        return self._refs[name]

    def find(self, model_ref: str) -> str | None:
        """Name of a registered model loaded from the same reference (paths compared resolved), if any."""
        wanted = reference_key(model_ref)
        return next((name for name, ref in self._refs.items() if reference_key(ref) == wanted), None)

    def add(self, name: str, model: str | Path) -> SentenceEncoder | RoleEncoder:
        """Load ``model`` (checkpoint dir, role pair, released PromCSE dir with ``promcse.json``, HF name or path,
        or ``minilm``) under ``name``.

        Raises:
            PromcseError: A taken or empty name, a name with ``#``, or a model that cannot be loaded.
        """
        if not name or "#" in name or name in self._refs:
            raise PromcseError(f"model name {name!r} is empty, holds '#' or is already registered")
        encoder = load(model, device=str(self.device), backbones=self._backbone)
        with self.lock:
            if isinstance(encoder, RoleEncoder):
                self._roles[name] = encoder
                self._encoders.update({f"{name}#{role}": side for role, side in encoder.roles.items()})
            else:
                self._encoders[name] = encoder
            self._refs[name] = str(model)
            self._banks.clear()  # the stacked prompt tables are rebuilt for the new set of models
        return encoder

    def _backbone(self, name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The shared backbone for a name, loaded on first use."""
        key = backbone_key(name_or_path)
        if key not in self._backbones:
            self._backbones[key] = load_backbone(name_or_path)
        return self._backbones[key]

    def entry(self, name: str, input_type: str | None = None) -> str:
        """The internal entry that encodes ``input_type`` (``query``/``document``, None: :data:`DEFAULT_ROLE`) for
        model ``name``: ``NAME#ROLE`` for a role pair, ``name`` itself for any other model (one prompt encodes
        both roles alike).

        Raises:
            PromcseError: Unknown model or input type.
        """
        if input_type is not None and input_type not in ROLES:
            raise PromcseError(f"unknown input_type {input_type!r}; choose one of {', '.join(ROLES)}",
                               key="input_type")
        self.get(name)
        return f"{name}#{input_type or DEFAULT_ROLE}" if name in self._roles else name

    def get(self, name: str | None = None) -> SentenceEncoder:
        """The encoder registered as ``name`` (the first one when None; a role pair's document role; an
        internal entry ``NAME#ROLE`` too).

        Raises:
            PromcseError: Unknown name (the available names are listed).
        """
        if name is None:
            if not self._refs:
                raise PromcseError("no models are registered")
            name = next(iter(self._refs))
        if name in self._roles:
            name = f"{name}#{DEFAULT_ROLE}"
        try:
            return self._encoders[name]
        except KeyError:
            raise PromcseError(f"unknown model {name!r}; available: {', '.join(self._refs) or 'none'}") from None

    def roles(self, name: str) -> RoleEncoder | None:
        """The role pair registered as ``name``, None for a model with one encoder."""
        self.get(name)
        return self._roles.get(name)

    def encode(self, texts: list[str], model: str | SentenceEncoder | None = None, batch_size: int = 64,
               normalize: bool = True, output: Literal["numpy", "torch"] = "numpy",
               show_progress: bool = False) -> np.ndarray | torch.Tensor:
        """Encode with the prompt of model ``model`` (a name, or an unlisted encoder, see :meth:`load_unlisted`);
        see :func:`promcse.encoder.encode.encode_texts`."""
        encoder = self.resolve(model)
        if self.onnx is not None and self.onnx.row_of(encoder) is not None:  # the server's ONNX backend
            vectors = np.stack(self.encode_rows(texts, [model or encoder] * len(texts), batch_size)) if len(texts) \
                else np.zeros((0, encoder.dim), dtype=np.float32)
            vectors = unit_rows(vectors).astype(np.float32) if normalize else vectors
            return torch.from_numpy(vectors) if output == "torch" else vectors
        with self.lock:
            return encoder.encode(texts, batch_size=batch_size, normalize=normalize, output=output,
                                  show_progress=show_progress)

    def similarity(self, a: list[str], b: list[str], model: str | None = None, batch_size: int = 64) -> np.ndarray:
        """Cosine similarity matrix (len(a), len(b)) under model ``model``."""
        encoder = self.get(model)
        with self.lock:
            return similarity(encoder, a, b, batch_size=batch_size)

    def token_counts(self, texts: Sequence[str], name: str | SentenceEncoder) -> list[int]:
        """Tokens of each text under model ``name`` (its tokenizer, truncated at its position limit)."""
        encoder = self.resolve(name)
        return [len(ids) for ids in encoder.tokenizer(list(texts), truncation=True,
                                                      max_length=encoder.max_length)["input_ids"]]

    def bank_of(self, name: str) -> tuple[PromptBank, int]:
        """The stacked prompts of every model sharing ``name``'s backbone and gating (cached), and ``name``'s prompt id."""
        encoder = self.get(name)
        backbone, key = encoder.backbone, (id(encoder.backbone), encoder.gated)  # gated prompts: a bank of their own
        if key not in self._banks:
            members = [n for n, e in self._encoders.items() if e.backbone is backbone and e.gated == encoder.gated]
            self._banks[key] = (build_bank([self._encoders[n] for n in members]), {n: i for i, n in enumerate(members)})
        bank, ids = self._banks[key]
        return bank, ids[name]

    def encode_rows(self, texts: Sequence[str], models: Sequence[str | SentenceEncoder],
                    batch_size: int = 64) -> list[np.ndarray]:
        """Encode ``texts[i]`` with model ``models[i]`` (a name, or an unlisted encoder such as a prompt-store
        entry): rows of every model sharing a backbone go through the same forward passes
        (:mod:`promcse.encoder.multiprompt`).

        Returns one float32 vector per row, in input order, as each model's own ``encode`` without
        ``normalize_embeddings``: raw, except for a model whose pipeline ends in Normalize (unit length). A list, not one (N, D) array:
        models over different backbones may have different dimensions, and one engine batch mixes them.
        """
        if len(texts) != len(models):
            raise PromcseError(f"{len(texts)} texts but {len(models)} model names")
        out: list[np.ndarray | None] = [None] * len(texts)
        with self.lock:
            encoders = [self.resolve(m) for m in models]
            done = self.onnx.encode(texts, encoders, batch_size) if self.onnx is not None else {}
            rest = [i for i in range(len(texts)) if i not in done]  # all rows on torch; the rest on onnx
            placed = self._placements([models[i] for i in rest], [encoders[i] for i in rest])
            for bank in {id(b): b for b, _ in placed}.values():
                rows = [k for k, (b, _) in enumerate(placed) if b is bank]
                vectors = encode_bank(bank, [texts[rest[k]] for k in rows], [placed[k][1] for k in rows],
                                      batch_size).numpy()
                done.update((rest[k], vectors[j]) for j, k in enumerate(rows))
            for row, vector in done.items():
                out[row] = unit_rows(vector).astype(np.float32) if encoders[row].unit_output else vector
        return [v for v in out if v is not None]

    def _placements(self, models: Sequence[str | SentenceEncoder],
                    encoders: Sequence[SentenceEncoder]) -> list[tuple[PromptBank, int]]:
        """(bank, prompt id) of every row: the cached bank when a backbone's rows all name listed models, else
        a bank of this batch's encoders of that backbone (unlisted ones change with the store: never cached)."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, encoder in enumerate(encoders):
            groups.setdefault((id(encoder.backbone), encoder.gated), []).append(i)
        placed: list[tuple[PromptBank, int] | None] = [None] * len(encoders)
        for rows in groups.values():
            if all(isinstance(models[i], str) for i in rows):
                for i in rows:
                    placed[i] = self.bank_of(str(models[i]))
                continue
            members = list({id(encoders[i]): encoders[i] for i in rows}.values())
            bank, ids = build_bank(members), {id(e): k for k, e in enumerate(members)}
            for i in rows:
                placed[i] = (bank, ids[id(encoders[i])])
        return [p for p in placed if p is not None]

    def resolve(self, model: str | SentenceEncoder | None) -> SentenceEncoder:
        """The encoder itself when given one (an unlisted model), else :meth:`get` of the name."""
        return model if isinstance(model, SentenceEncoder) else self.get(model)

    def load_unlisted(self, model: str | Path, new_backbones: bool = True) -> SentenceEncoder | RoleEncoder:
        """Load ``model`` over this registry's shared backbones without listing it (the prompt store's loads).

        Loaded under the registry's lock: building an encoder may set flags on the shared backbone module.
        ``new_backbones=False`` (an uploaded prompt) refuses a backbone the registry does not hold yet, so a
        request can never make the server read or download another model.

        Raises:
            PromcseError: The model does not load; or, without ``new_backbones``, its backbone is not held
                (``key="backbone"``).
        """
        with self.lock:
            return load(model, device=str(self.device), backbones=self._backbone if new_backbones else self._held)

    def hold_backbone(self, name_or_path: str) -> None:
        """Load a backbone now (once), so that uploaded prompts may use it (``promcse serve --store-backbone``)."""
        with self.lock:
            self._backbone(name_or_path)

    def _held(self, name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """A backbone this registry holds already; PromcseError naming it otherwise."""
        held = self._backbones.get(backbone_key(name_or_path))
        if held is None:
            raise PromcseError(f"backbone {name_or_path!r} is not loaded on this server: an uploaded prompt may use "
                               "only a backbone the server holds (a start-up model's, one a store prompt has "
                               "loaded, or one named as a store backbone at start)", key="backbone")
        return held

    def describe(self, name: str) -> dict[str, Any]:
        """JSON-able facts about one registered model (for ``GET /models``)."""
        facts = self._facts(name, self.get(name))
        pair = self._roles.get(name)
        if pair is not None:
            facts["roles"] = {role: self._facts(name, side) for role, side in pair.roles.items()}
            facts["default_input_type"] = DEFAULT_ROLE
        return facts

    @staticmethod
    def _facts(name: str, encoder: SentenceEncoder) -> dict[str, Any]:
        """What :meth:`describe` says about one encoder."""
        spec = encoder.spec
        prompt_params = sum(p.numel() for p in encoder.prompt.parameters()) if encoder.prompt is not None else 0
        return {"name": name, "backbone": spec.backbone, "mode": spec.mode, "pooler": spec.pooler,
                "head": spec.head, "dim": encoder.dim,
                "prompt_length": spec.prompt.length if spec.prompt is not None else 0,
                "prompt_parameters": prompt_params,
                "shift_positions": spec.prompt.shift_positions if spec.prompt is not None else False,
                "prompt_gate": encoder.gated, "max_length": encoder.max_length}


def load_many(models: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]], device: str = "auto") -> PromptRegistry:
    """Load several models into one :class:`PromptRegistry` (checkpoints on one backbone share it).

    Args:
        models: ``{name: model}`` or ``[(name, model), ...]``.
        device: Where to run them.
    """
    registry = PromptRegistry(device)
    items = models.items() if isinstance(models, Mapping) else models
    for name, model in items:
        registry.add(name, model)
    return registry
