"""A sentence encoder: backbone + optional deep prompt + pooler + optional MLP head -> (B, D)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.encoder.encode import encode_texts, similarity
from promcse.encoder.outputs import Embeddings, Precision, check_batch_size, check_texts, encode_options, finish
from promcse.encoder.backbone import (BackboneShape, check_prompt_support, freeze, load_backbone, pipeline_normalizes,
                                      position_limit, shape_of)
from promcse.errors import PromcseError
from promcse.encoder.pooling import HEAD_MODES, POOLERS, MLPHead
from promcse.encoder.prompt import DeepPrompt, PromptSpec, run_encoder, use_gated_attention
from promcse.io.schema import read_encoder

MODES: tuple[str, ...] = ("prompt", "full", "frozen")


@dataclass
class EncoderSpec:
    """Everything needed to rebuild an encoder around a backbone (stored in checkpoints).

    Attributes:
        backbone: Backbone name or path as the user gave it (``minilm`` for the bundled one).
        shape: The backbone's shape facts, checked on load.
        mode: ``prompt`` (frozen backbone + deep prompt), ``full`` (fine-tuned backbone) or ``frozen``.
        prompt: Prompt spec, or None without a prompt.
        pooler: Key of :data:`promcse.encoder.pooling.POOLERS`.
        head: ``none``, ``train_only`` or ``always``.
    """

    backbone: str
    shape: BackboneShape
    mode: str = "prompt"
    prompt: PromptSpec | None = None
    pooler: str = "avg"
    head: str = "none"
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        out = asdict(self)
        out["shape"] = self.shape.to_dict()
        if self.prompt is not None and not self.prompt.gate:
            del out["prompt"]["gate"]  # an ungated prompt's config.json stays as it was before gates existed
        return out

    @classmethod
    def from_dict(cls, data: object) -> "EncoderSpec":
        """Inverse of :meth:`to_dict`, every field type- and range-checked (:func:`promcse.io.schema.read_encoder`).

        Raises:
            PromcseError: Naming the key (``encoder.prompt.length``, ...) that is wrong.
        """
        values = read_encoder(data)
        values["shape"] = BackboneShape(**values["shape"])
        if values["prompt"] is not None:
            values["prompt"] = PromptSpec(**values["prompt"])
        spec = cls(**values)
        check_spec(spec)
        return spec


def check_choices(mode: str, pooler: str, head: str, prompt_length: int, section: str = "model") -> None:
    """Reject impossible encoder settings; shared by run configs and checkpoint specs.

    Raises:
        PromcseError: Naming the key (``model.pooler``, ...) and the valid choices.
    """
    checks = [
        (pooler in POOLERS, "pooler", f"unknown pooler '{pooler}'; choose one of {', '.join(POOLERS)}"),
        (head in HEAD_MODES, "head", f"unknown head mode '{head}'; choose one of {', '.join(HEAD_MODES)}"),
        (mode in MODES, "mode", f"unknown mode '{mode}'; choose one of {', '.join(MODES)}"),
        (mode != "prompt" or prompt_length > 0, "prompt_length", "prompt mode needs prompt_length > 0"),
        (pooler != "cls_before_pooler" or head == "none", "head",
         "pooler 'cls_before_pooler' is the raw [CLS] vector without the MLP head: use head 'none' (or pooler "
         "'cls' for [CLS] + head)"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise PromcseError(message, key=f"{section}.{key}")


def check_spec(spec: EncoderSpec) -> None:
    """Reject impossible combinations before any weights are loaded."""
    length = spec.prompt.length if spec.prompt is not None else 0
    check_choices(spec.mode, spec.pooler, spec.head, length)
    if spec.prompt is not None and spec.prompt.gate and spec.prompt.shift_positions:
        raise PromcseError("a gated prompt (model.prompt_gate) keeps the backbone's positions, so that it starts as "
                           "an exact no-op: set model.shift_positions=false", key="model.shift_positions")


class SentenceEncoder(nn.Module):
    """Backbone + optional deep prompt + pooler + optional MLP head.

    Several encoders may share one backbone module object (one copy of its weights in memory); each
    forward call passes its own prompt to the backbone, so sharing is safe.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: EncoderSpec,
        prompt: DeepPrompt | None = None,
        head: MLPHead | None = None,
    ) -> None:
        super().__init__()
        check_spec(spec)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec
        self.prompt = prompt
        self.head = head
        self.pool_fn, self.needs_all_layers = POOLERS[spec.pooler]
        # Whether the backbone's sentence-transformers pipeline ends in Normalize: ``encode`` then returns unit
        # vectors as sentence-transformers does (set by build_encoder from the backbone's modules.json).
        self.unit_output = False

    @property
    def device(self) -> torch.device:
        """Device of the backbone weights."""
        return next(self.backbone.parameters()).device

    @property
    def max_length(self) -> int:
        """Longest real-token input: the backbone's position limit less the prompt's shift."""
        shifted = self.prompt is not None and self.prompt.spec.shift_positions
        shift = self.prompt.spec.length if shifted else 0
        return position_limit(self.backbone.config) - shift

    @property
    def gated(self) -> bool:
        """Whether the prompt is gated (``model.prompt_gate``); paths that cannot carry gates refuse such encoders."""
        return self.prompt is not None and self.prompt.spec.gate

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.spec.shape.hidden_size

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Tokenize with padding to the longest text and truncation at ``max_length`` (default: position limit)."""
        limit = min(max_length or self.max_length, self.max_length)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def use_head(self) -> bool:
        """Whether the MLP head applies now (train-only heads are skipped in eval mode)."""
        if self.head is None or self.spec.head == "none":
            return False
        return self.spec.head == "always" or self.training

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """Embed a tokenized batch: (B, D) sentence vectors (not normalised)."""
        hidden_states = run_encoder(self.backbone, inputs, self.prompt, self.needs_all_layers)
        pooled = self.pool_fn(hidden_states, inputs["attention_mask"])
        return self.head(pooled) if self.use_head() else pooled

    def encode(self, sentences: str | Sequence[str], batch_size: int = 64, show_progress_bar: bool | None = None,
               precision: Precision = "float32", convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, truncate_dim: int | None = None, max_length: int | None = None,
               **aliases: Any) -> Embeddings:
        """Encode texts, with sentence-transformers' ``encode`` arguments, defaults and return shapes.

        Returns an (N, D) float32 numpy array in input order (one string: a (D,) vector); see
        :mod:`promcse.encoder.outputs` for ``precision``, ``truncate_dim``, ``convert_to_tensor`` and
        ``convert_to_numpy``. ``normalize_embeddings`` defaults to False as in sentence-transformers (before 0.2
        promcse normalised by default); a model whose pipeline ends in ``Normalize`` (:attr:`unit_output`, e.g.
        all-MiniLM-L6-v2) returns unit vectors either way, as sentence-transformers does.

        Args:
            sentences: A text or a list of texts.
            batch_size: Texts per forward pass (texts are sorted by token count, so batches pad little).
            show_progress_bar: Show a tqdm bar (None: no bar).
            precision: ``float32``, ``int8``, ``uint8``, ``binary`` or ``ubinary``.
            convert_to_numpy: One numpy array (False: a list of tensors).
            convert_to_tensor: One torch tensor.
            normalize_embeddings: L2-normalise the returned vectors.
            truncate_dim: Keep the first this-many dimensions.
            max_length: Truncate inputs at this many tokens (default: the model's limit).
            **aliases: promcse's older names, still accepted: ``normalize`` (= ``normalize_embeddings``),
                ``show_progress`` (= ``show_progress_bar``), ``output`` (``"torch"`` = ``convert_to_tensor``).
        """
        texts, single = check_texts(sentences)
        check_batch_size(batch_size)
        options, show = encode_options(aliases, normalize_embeddings=normalize_embeddings, truncate_dim=truncate_dim,
                                       precision=precision, convert_to_numpy=convert_to_numpy,
                                       convert_to_tensor=convert_to_tensor, show_progress_bar=show_progress_bar)
        raw = encode_texts(self, texts, batch_size=batch_size, normalize=False, output="torch", show_progress=show,
                           max_length=max_length)
        return finish(raw, self.unit_output, options, single)

    def encode_query(self, texts: list[str], **kwargs: Any) -> Any:
        """Encode search queries: one prompt encodes both roles alike, so this is :meth:`encode`."""
        return self.encode(texts, **kwargs)

    def encode_document(self, texts: list[str], **kwargs: Any) -> Any:
        """Encode documents: one prompt encodes both roles alike, so this is :meth:`encode`."""
        return self.encode(texts, **kwargs)

    def similarity(self, a: Any, b: Any, batch_size: int = 64) -> Any:
        """Cosine similarity matrix (len(a), len(b)) between two lists of texts or two embedding matrices."""
        return similarity(self, a, b, batch_size=batch_size)

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        """Every tensor the optimizer updates, by name (prompt and head; the backbone too in full mode)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The values of :meth:`trainable_tensors`, in module order (what the optimizer gets)."""
        return list(self.trainable_tensors().values())


def build_encoder(
    spec: EncoderSpec,
    backbone: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> SentenceEncoder:
    """Create a fresh encoder (new prompt/head init) around a loaded or given backbone.

    Raises:
        PromcseError: If the spec is inconsistent or disagrees with the backbone's shape.
    """
    check_spec(spec)
    if spec.prompt is not None:
        check_prompt_support(spec.shape.model_type)  # before loading weights a prompt could not use
    if backbone is None or tokenizer is None:
        backbone, tokenizer = load_backbone(spec.backbone)
    actual = shape_of(backbone.config)
    diffs = actual.differences(spec.shape)
    if diffs:
        raise PromcseError(
            f"checkpoint was made for a different backbone than '{spec.backbone}': " + "; ".join(diffs),
            key="backbone",
        )
    if spec.mode != "full":
        freeze(backbone)
    if spec.prompt is not None and spec.prompt.gate:
        use_gated_attention(backbone)  # before any forward, so that an unusable backbone is refused here
    prompt = DeepPrompt(spec.prompt) if spec.prompt is not None else None
    head = MLPHead(actual.hidden_size) if spec.head != "none" else None
    encoder = SentenceEncoder(backbone, tokenizer, spec, prompt, head)
    encoder.unit_output = pipeline_normalizes(spec.backbone)
    return encoder


def default_spec(backbone_name: str, backbone: PreTrainedModel) -> EncoderSpec:
    """Spec of a plain frozen encoder with mean pooling (what ``minilm`` or a bare HF name means)."""
    return EncoderSpec(backbone=backbone_name, shape=shape_of(backbone.config), mode="frozen", pooler="avg")

