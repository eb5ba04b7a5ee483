"""The deep soft prompt (P-tuning v2 prefix) and all glue that feeds it to a Hugging Face encoder.

For each of the L layers, P trainable key and value vectors (per head) are prepended to the layer's
attention keys/values; real tokens attend to them, the prefix has no hidden states of its own.
The parameter table is ``Embedding(P, L*2*H)`` initialised N(0, 0.02), optionally reparameterised as
``Embedding(P, H) -> Linear(H, 512) -> Tanh -> Linear(512, L*2*H)``. Dropout (p=0.1) is applied to the
prefix at training time, independently per batch row. The attention mask gets P leading ones.

Why not PEFT's ``PrefixTuningConfig``: PEFT keeps the active adapter as mutable model state
(``set_adapter``), so one shared backbone cannot answer concurrent requests that name different
prompts; its prefix has no dropout and the wrong init; and transformers 5.24 declares a PEFT newer
than the registry has. Here the prefix is an explicit argument of every forward call, which makes
per-request prompt selection over one backbone thread-safe and keeps every version-specific detail
(cache object, mask shape, position shift) in this one module.

Position shift: the reference passes the prefix as ``past_key_values``; HF BERT/RoBERTa then start
the real tokens' position ids at P. We keep that (checkpoint compatibility): the cache we pass has
sequence length P, so transformers applies the same shift.

Gated prefix (``PromptSpec.gate``, LLaMA-Adapter's zero-init attention, Zhang et al. 2023): each layer's
attention output becomes ``softmax(q K_real) V_real + tanh(g_l) * softmax(q K_prefix) V_prefix``, two softmaxes
over their own keys, with one gate per layer and head initialised to 0; with unshifted positions the encoder
then starts exactly as the frozen backbone. The separate softmax is :func:`gated_attention`, registered in
transformers' ``AttentionInterface``: a backbone that carries a gated prompt is switched once to it
(:func:`use_gated_attention`; calls without a gate run transformers' own SDPA function, unchanged) and the
gate values travel as the ``prompt_gate`` argument of each forward call (transformers passes unknown keyword
arguments through every layer to the attention function), like the prefix itself: no prompt state lives on
the shared backbone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from promcse.encoder.backbone import BackboneShape, reference_init_, row_position_ids, unshifted_position_ids
from promcse.errors import PromcseError

GATED_ATTENTION = "promcse_gated_sdpa"  # the AttentionInterface name of gated_attention


@dataclass(frozen=True)
class PromptSpec:
    """Shape and regularisation of a deep prompt.

    Attributes:
        length: Number of prefix positions P.
        num_layers: Encoder layers L.
        num_heads: Attention heads per layer.
        hidden_size: Hidden size H (= heads * head_dim).
        projection: Use the reparameterisation MLP.
        projection_hidden: Hidden width of that MLP (512 in the reference).
        dropout: Dropout on the prefix at training time.
        init_std: Standard deviation of the N(0, std) init of the prefix table.
        shift_positions: Start real tokens' position ids at P, as the reference does (needed to reproduce
            released checkpoints). False keeps the backbone's own positions: measured on all-MiniLM-L6-v2,
            STS-B dev, P=10, untrained zero prefix: 85.00 shifted vs 86.84 unshifted (no prefix: 86.72).
        gate: Gate the prefix (see the module docstring): its own softmax, scaled by ``tanh(g)`` per layer and
            head, ``g`` = 0 at init. Needs ``shift_positions=False``, so that the untrained prompt is an exact
            no-op.
    """

    length: int
    num_layers: int
    num_heads: int
    hidden_size: int
    projection: bool = False
    projection_hidden: int = 512
    dropout: float = 0.1
    init_std: float = 0.02
    shift_positions: bool = True
    gate: bool = False

    @classmethod
    def for_backbone(cls, shape: BackboneShape, length: int, **kwargs: float | int | bool) -> "PromptSpec":
        """Spec matching a backbone's layers, heads and hidden size."""
        return cls(length, shape.num_layers, shape.num_heads, shape.hidden_size, **kwargs)  # type: ignore[arg-type]


class DeepPrompt(nn.Module):
    """P-tuning v2 prefix: per-layer key/value vectors, as in PromCSE's ``PrefixEncoder``.

    Parameter names follow the reference (``embedding.weight``; ``trans.0``/``trans.2`` for the MLP)
    so that released checkpoints map onto it by prefix only.
    """

    def __init__(self, spec: PromptSpec) -> None:
        super().__init__()
        self.spec = spec
        width = spec.num_layers * 2 * spec.hidden_size
        if spec.projection:
            self.embedding = nn.Embedding(spec.length, spec.hidden_size)
            self.trans: nn.Module | None = nn.Sequential(
                nn.Linear(spec.hidden_size, spec.projection_hidden),
                nn.Tanh(),
                nn.Linear(spec.projection_hidden, width),
            )
            reference_init_(self.trans)  # N(0, 0.02) weights, zero bias, as the reference's cl_init
        else:
            self.embedding = nn.Embedding(spec.length, width)
            self.trans = None
        self.dropout = nn.Dropout(spec.dropout)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=spec.init_std)
        # (L, heads) zero-initialised gates of a gated prompt (stored as ``prompt.gate``); None otherwise
        self.gate = nn.Parameter(torch.zeros(spec.num_layers, spec.num_heads)) if spec.gate else None

    def gate_values(self) -> Tensor | None:
        """``tanh`` of the gates, (L, heads), for :func:`gated_attention`; None for an ungated prompt."""
        return torch.tanh(self.gate) if self.gate is not None else None

    def table(self) -> Tensor:
        """The (P, L*2*H) prefix before dropout."""
        weight = self.embedding.weight
        return self.trans(weight) if self.trans is not None else weight

    def forward(self, batch_size: int) -> tuple[tuple[Tensor, Tensor], ...]:
        """Per-layer (key, value) prefixes, each (B, heads, P, head_dim), dropout drawn per row."""
        flat = self.table().unsqueeze(0).expand(batch_size, -1, -1)
        flat = self.dropout(flat)  # independent mask per batch row (the tensor is materialised per row)
        return split_layers(flat, self.spec.num_layers, self.spec.num_heads)


def split_layers(flat: Tensor, num_layers: int, num_heads: int) -> tuple[tuple[Tensor, Tensor], ...]:
    """(B, P, L*2*H) rows in the reference layout -> per-layer (key, value), each (B, heads, P, head_dim)."""
    batch, length, width = flat.shape
    heads = flat.reshape(batch, length, num_layers * 2, num_heads, width // (num_layers * 2 * num_heads))
    # unbind, not indexing: one backward op instead of a zero-fill + add of the whole gradient per slice
    per_layer = heads.permute(2, 0, 3, 1, 4).unbind(0)  # L*2 tensors of (B, heads, P, head_dim)
    return tuple((per_layer[2 * i], per_layer[2 * i + 1]) for i in range(num_layers))


def prefix_cache(prefix: tuple[tuple[Tensor, Tensor], ...]) -> DynamicCache:
    """Wrap per-layer prefixes in the cache object transformers' encoders concatenate keys onto.

    A fresh cache is needed for every forward pass: the encoder appends the real tokens' keys to it.
    """
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in prefix])


def prefixed_attention_mask(attention_mask: Tensor, prefix_length: int, dtype: torch.dtype) -> Tensor:
    """Additive 4-D mask (B, 1, T, P+T): P leading visible prefix slots, then the token mask.

    transformers uses a ready 4-D mask as given, which keeps the prefix handling independent of how a
    given version infers key length from a 2-D mask.
    """
    batch, length = attention_mask.shape
    ones = attention_mask.new_ones(batch, prefix_length)
    return _additive(torch.cat([ones, attention_mask], dim=1).to(torch.bool), length, dtype)


def rows_attention_mask(attention_mask: Tensor, visible: Tensor, prefix_length: int, dtype: torch.dtype) -> Tensor:
    """Additive (B, 1, T, P+T) mask where row b sees its first ``visible[b]`` of the P prefix slots."""
    length = attention_mask.shape[1]
    slots = torch.arange(prefix_length, device=attention_mask.device)
    prefix_keep = slots.unsqueeze(0) < visible.to(attention_mask.device).unsqueeze(1)  # (B, P)
    return _additive(torch.cat([prefix_keep, attention_mask.to(torch.bool)], dim=1), length, dtype)


def _additive(keep: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """(B, K) keep flags -> additive (B, 1, T, K) mask: 0 where kept, the dtype's minimum elsewhere."""
    additive = torch.zeros(keep.shape[0], 1, length, keep.shape[1], dtype=dtype, device=keep.device)
    return additive.masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)


def gated_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None, prompt_gate: Tensor | None = None,
                    **kwargs: object) -> tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface`` name :data:`GATED_ATTENTION`) of gated prompts.

    Without ``prompt_gate`` this is transformers' SDPA attention, unchanged. With it, the P prefix slots lead
    ``key``/``value`` (P = key length - query length, the cache's length) and ``attention_mask`` (B, 1, T, P+T),
    and the output is ``softmax(q K_real) V_real + gate * softmax(q K_prefix) V_prefix``: the first term is
    exactly the attention without a prefix. ``prompt_gate`` holds gate values (already ``tanh``-ed) as
    (L, heads), or (B, L, heads) with a row's own; the layer's are picked by ``module.layer_idx``.

    Returns:
        (B, T, heads, head_dim) attention output and no weights, as transformers' SDPA function.
    """
    if prompt_gate is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    slots = key.shape[2] - query.shape[2]
    prefix_mask = real_mask = None
    if attention_mask is not None:
        prefix_mask, real_mask = attention_mask[..., :slots], attention_mask[..., slots:]
    real, _ = sdpa_attention_forward(module, query, key[:, :, slots:], value[:, :, slots:], real_mask,
                                     dropout=dropout, scaling=scaling, **kwargs)
    prefix, _ = sdpa_attention_forward(module, query, key[:, :, :slots], value[:, :, :slots], prefix_mask,
                                       dropout=dropout, scaling=scaling, **kwargs)
    gate = prompt_gate[..., module.layer_idx, :].unsqueeze(-2).unsqueeze(-1)  # (1|B, 1, heads, 1)
    return real + gate.to(prefix.dtype) * prefix, None


def use_gated_attention(backbone: nn.Module) -> None:
    """Switch a backbone's attention to :func:`gated_attention` (idempotent; needed once per backbone module).

    Backbone-wide, but no prompt state: calls without ``prompt_gate`` compute exactly what SDPA computed before,
    so the other prompts sharing this backbone are unaffected.

    Raises:
        PromcseError: A backbone loaded with another attention implementation than SDPA.
    """
    current = backbone.config._attn_implementation
    if current == GATED_ATTENTION:
        return
    if current != "sdpa":
        raise PromcseError(f"a gated prompt (model.prompt_gate) needs the backbone's SDPA attention, not '{current}'",
                           key="model.prompt_gate")
    AttentionInterface.register(GATED_ATTENTION, gated_attention)
    AttentionMaskInterface.register(GATED_ATTENTION, sdpa_mask)  # masks built for it are SDPA's
    backbone.set_attn_implementation(GATED_ATTENTION)


def _gate_argument(backbone: nn.Module, gate: Tensor | None, kwargs: dict[str, object]) -> None:
    """Add ``prompt_gate`` to the forward's keyword arguments (and switch the attention) when there is a gate."""
    if gate is not None:
        use_gated_attention(backbone)
        kwargs["prompt_gate"] = gate


def run_encoder_rows(backbone: nn.Module, inputs: dict[str, Tensor], prefix: Tensor | None, visible: Tensor,
                     shift: Tensor, output_hidden_states: bool = False,
                     gate: Tensor | None = None) -> tuple[Tensor, ...]:
    """Run the encoder with a different prompt per row: the mixed-prompt forward.

    Args:
        backbone: A transformers encoder.
        inputs: Tokenizer output (``input_ids``, ``attention_mask``, ...), B rows.
        prefix: (B, P, L*2*H) prefix tables, each row's prompt padded to P (None when no row has one).
        visible: (B,) number of real prefix slots of each row (0 for a bare-backbone row): the rest are masked.
        shift: (B,) position shift of each row's real tokens (its P with ``shift_positions``, else 0).
        output_hidden_states: Also return every layer's output.
        gate: (B, L, heads) gate values of each row's gated prompt (0 for rows without one), or None when no
            prompt is gated; a gated forward's rows all take the separate prefix softmax.

    Returns:
        As :func:`run_encoder`: hidden states of the real tokens only.
    """
    mask = inputs["attention_mask"]
    kwargs: dict[str, object] = {"output_hidden_states": output_hidden_states, "return_dict": True}
    if prefix is not None and prefix.shape[1] > 0:
        config = backbone.config
        kwargs["cache"] = DynamicCache(ddp_cache_data=list(split_layers(prefix, config.num_hidden_layers,
                                                                          config.num_attention_heads)))
        kwargs["position_ids"] = row_position_ids(config, inputs["input_ids"], mask, shift)
        mask = rows_attention_mask(mask, visible, prefix.shape[1], prefix.dtype)
        _gate_argument(backbone, gate, kwargs)
    accepted = forward_inputs(backbone)
    model_inputs = {k: v for k, v in inputs.items() if k != "attention_mask" and k in accepted}
    out = backbone(**model_inputs, attention_mask=mask, **kwargs)
    return tuple(out.hidden_states) if output_hidden_states else (out.last_hidden_state,)


def forward_inputs(backbone: nn.Module) -> frozenset[str]:
    """Names the backbone's forward accepts (DistilBERT, e.g., takes no ``token_type_ids``), cached on it."""
    names = getattr(backbone, "_promcse_forward_inputs", None)
    if names is None:
        names = frozenset(inspect.signature(backbone.forward).parameters)
        backbone._promcse_forward_inputs = names  # type: ignore[assignment]
    return names


def run_encoder(
    backbone: nn.Module,
    inputs: dict[str, Tensor],
    prompt: DeepPrompt | None,
    output_hidden_states: bool = False,
) -> tuple[Tensor, ...]:
    """Run the encoder with an optional deep prompt; return its hidden states.

    Args:
        backbone: A transformers encoder (``AutoModel``).
        inputs: Tokenizer output with ``input_ids`` and ``attention_mask`` (and optional token types).
        prompt: The deep prompt, or None for the plain encoder (a gated prompt's gates go along as ``prompt_gate``).
        output_hidden_states: Also return every layer's output.

    Returns:
        ``(last_hidden_state,)`` or all hidden states (embeddings first) when requested; only real tokens,
        never prefix positions.
    """
    kwargs: dict[str, object] = {"output_hidden_states": output_hidden_states, "return_dict": True}
    mask = inputs["attention_mask"]
    if prompt is not None:
        dtype = next(backbone.parameters()).dtype
        kwargs["cache"] = prefix_cache(prompt(mask.shape[0]))
        if not prompt.spec.shift_positions and "position_ids" not in inputs:
            kwargs["position_ids"] = unshifted_position_ids(backbone.config, inputs["input_ids"], mask)
        mask = prefixed_attention_mask(mask, prompt.spec.length, dtype)
        _gate_argument(backbone, prompt.gate_values(), kwargs)
    accepted = forward_inputs(backbone)
    model_inputs = {k: v for k, v in inputs.items() if k != "attention_mask" and k in accepted}
    out = backbone(**model_inputs, attention_mask=mask, **kwargs)
    return tuple(out.hidden_states) if output_hidden_states else (out.last_hidden_state,)
