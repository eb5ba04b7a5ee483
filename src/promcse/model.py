"""A sentence encoder: backbone + optional deep prompt + pooler + optional MLP head -> (B, D)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from promcse.backbone import BackboneShape, freeze, load_backbone, position_limit, shape_of
from promcse.errors import PromcseError
from promcse.pooling import HEAD_MODES, POOLERS, MLPHead
from promcse.prompt import DeepPrompt, PromptSpec, run_encoder

MODES: tuple[str, ...] = ("prompt", "full", "frozen")


@dataclass
class EncoderSpec:
    """Everything needed to rebuild an encoder around a backbone (stored in checkpoints).

    Attributes:
        backbone: Backbone name or path as the user gave it (``minilm`` for the bundled one).
        shape: The backbone's shape facts, checked on load.
        mode: ``prompt`` (frozen backbone + deep prompt), ``full`` (fine-tuned backbone) or ``frozen``.
        prompt: Prompt spec, or None without a prompt.
        pooler: Key of :data:`promcse.pooling.POOLERS`.
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
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "EncoderSpec":
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["shape"] = BackboneShape(**values["shape"])  # type: ignore[arg-type]
        if values.get("prompt") is not None:
            values["prompt"] = PromptSpec(**values["prompt"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def check_spec(spec: EncoderSpec) -> None:
    """Reject impossible combinations before any weights are loaded."""
    if spec.pooler not in POOLERS:
        raise PromcseError(f"unknown pooler '{spec.pooler}'; choose one of {', '.join(POOLERS)}", key="model.pooler")
    if spec.head not in HEAD_MODES:
        raise PromcseError(f"unknown head mode '{spec.head}'; choose one of {', '.join(HEAD_MODES)}", key="model.head")
    if spec.mode not in MODES:
        raise PromcseError(f"unknown mode '{spec.mode}'; choose one of {', '.join(MODES)}", key="model.mode")
    if spec.mode == "prompt" and spec.prompt is None:
        raise PromcseError("mode 'prompt' needs a prompt length > 0", key="model.prompt_length")


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

    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = True, **kwargs: Any) -> Any:
        """Encode texts to an (N, D) array in input order; see :func:`promcse.encode.encode_texts`."""
        from promcse.encode import encode_texts

        return encode_texts(self, texts, batch_size=batch_size, normalize=normalize, **kwargs)

    def similarity(self, a: list[str], b: list[str], batch_size: int = 64) -> Any:
        """Cosine similarity matrix (len(a), len(b)) between two lists of texts."""
        from promcse.encode import similarity

        return similarity(self, a, b, batch_size=batch_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (prompt and head in prompt mode; everything in full mode)."""
        return [p for p in self.parameters() if p.requires_grad]


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
    prompt = DeepPrompt(spec.prompt) if spec.prompt is not None else None
    head = MLPHead(actual.hidden_size) if spec.head != "none" else None
    return SentenceEncoder(backbone, tokenizer, spec, prompt, head)


def default_spec(backbone_name: str, backbone: PreTrainedModel) -> EncoderSpec:
    """Spec of a plain frozen encoder with mean pooling (what ``minilm`` or a bare HF name means)."""
    return EncoderSpec(backbone=backbone_name, shape=shape_of(backbone.config), mode="frozen", pooler="avg")

