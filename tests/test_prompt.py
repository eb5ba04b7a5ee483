"""Deep prompt: parameter counts, shapes, init, dropout, masks and the reference's position shift."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from promcse.backbone import BackboneShape, position_limit, shape_of
from promcse.pooling import MLPHead
from promcse.prompt import DeepPrompt, PromptSpec, prefixed_attention_mask, run_encoder

BERT_BASE = BackboneShape("bert", num_layers=12, num_heads=12, hidden_size=768, vocab_size=30522)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_bert_base_parameter_counts_match_the_paper() -> None:
    assert n_params(DeepPrompt(PromptSpec.for_backbone(BERT_BASE, 16))) == 294_912
    assert n_params(MLPHead(768)) == 590_592


def test_projection_prompt_shapes() -> None:
    spec = PromptSpec.for_backbone(BERT_BASE, 4, projection=True)
    prompt = DeepPrompt(spec)
    assert prompt.embedding.weight.shape == (4, 768)
    assert prompt.table().shape == (4, 12 * 2 * 768)


def test_init_is_normal_002() -> None:
    torch.manual_seed(0)
    weight = DeepPrompt(PromptSpec.for_backbone(BERT_BASE, 16)).embedding.weight
    assert abs(weight.mean().item()) < 1e-3
    assert weight.std().item() == pytest.approx(0.02, rel=0.02)


def test_per_layer_key_value_layout_follows_reference() -> None:
    shape = BackboneShape("bert", 2, 4, 32, 100)
    prompt = DeepPrompt(PromptSpec.for_backbone(shape, 3)).eval()
    layers = prompt(batch_size=2)
    assert len(layers) == 2
    table = prompt.embedding.weight.view(3, 4, 4, 8)  # (P, L*2, heads, head_dim)
    for layer, (key, value) in enumerate(layers):
        assert key.shape == value.shape == (2, 4, 3, 8)
        assert torch.equal(key[1], table[:, 2 * layer].permute(1, 0, 2))
        assert torch.equal(value[0], table[:, 2 * layer + 1].permute(1, 0, 2))


def test_prefix_dropout_is_per_row_in_training_and_off_in_eval() -> None:
    shape = BackboneShape("bert", 1, 2, 16, 100)
    prompt = DeepPrompt(PromptSpec.for_backbone(shape, 4, dropout=0.5))
    prompt.train()
    key = prompt(batch_size=2)[0][0]
    assert not torch.equal(key[0], key[1]), "rows must get independent dropout masks"
    assert (key == 0).any()
    prompt.eval()
    key = prompt(batch_size=2)[0][0]
    assert torch.equal(key[0], key[1])


def test_mask_has_prefix_ones_then_token_mask() -> None:
    mask = torch.tensor([[1, 1, 0]])
    additive = prefixed_attention_mask(mask, 2, torch.float32)
    assert additive.shape == (1, 1, 3, 5)
    visible = additive[0, 0, 0] == 0
    assert visible.tolist() == [True, True, True, True, False]


def manual_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                   prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...], shift: int) -> torch.Tensor:
    """Plain re-implementation of BERT with prefix keys/values and positions starting at ``shift``."""
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    emb = model.embeddings
    positions = torch.arange(shift, shift + ids.shape[1])
    h = emb.word_embeddings(ids) + emb.position_embeddings(positions)[None] + emb.token_type_embeddings(torch.zeros_like(ids))
    h = emb.LayerNorm(h)
    keep = torch.cat([torch.ones(ids.shape[0], prefix[0][0].shape[2]), mask.float()], dim=1)
    for layer, (pk, pv) in zip(model.encoder.layer, prefix):
        att = layer.attention.self

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

        q, k, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(keep[:, None, None, :] == 0, -1e9)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    return h


def test_run_encoder_equals_manual_prefix_attention_with_position_shift(tiny_bert: Path) -> None:
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    inputs = tok(["a man is playing guitar", "the dog runs"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    prompt = DeepPrompt(PromptSpec.for_backbone(shape_of(model.config), 5, init_std=0.5)).eval()
    with torch.no_grad():
        ours = run_encoder(model, dict(inputs), prompt)[0]
        expected = manual_forward(model, inputs["input_ids"], inputs["attention_mask"], prompt(2), shift=5)
        unshifted = manual_forward(model, inputs["input_ids"], inputs["attention_mask"], prompt(2), shift=0)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(ours[real], expected[real], atol=1e-5)
    assert not torch.allclose(ours[real], unshifted[real], atol=1e-3), "positions must be shifted by P"


def test_prefix_changes_output_and_none_is_plain_encoder(tiny_bert: Path) -> None:
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    inputs = dict(tok(["a man is playing guitar"], return_tensors="pt"))
    with torch.no_grad():
        plain = run_encoder(model, inputs, None)[0]
        reference = model(**inputs).last_hidden_state
    assert torch.equal(plain, reference)


def test_roberta_prefix_runs_and_reserves_positions(tiny_roberta: Path) -> None:
    model = AutoModel.from_pretrained(str(tiny_roberta)).eval()
    assert position_limit(model.config) == 66 - 2
    prompt = DeepPrompt(PromptSpec.for_backbone(shape_of(model.config), 4)).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        out = run_encoder(model, {"input_ids": ids, "attention_mask": mask}, prompt, output_hidden_states=True)
    assert len(out) == 3 and out[-1].shape == (2, 5, 32)
    assert torch.isfinite(out[-1]).all()


def test_prefix_matches_peft_prefix_tuning(tiny_bert: Path) -> None:
    peft = pytest.importorskip("peft")
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    inputs = dict(tok(["a man is playing guitar", "the dog runs"], padding=True, return_tensors="pt"))
    prompt = DeepPrompt(PromptSpec.for_backbone(shape_of(model.config), 5, init_std=0.3)).eval()
    with torch.no_grad():
        ours = run_encoder(model, inputs, prompt)[0]
        config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=5)
        wrapped = peft.get_peft_model(model, config)
        wrapped.prompt_encoder["default"].embedding.weight.copy_(prompt.embedding.weight)
        theirs = wrapped.eval()(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


def test_unshifted_positions_option_matches_manual_attention(tiny_bert: Path) -> None:
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    inputs = tok(["a man is playing guitar", "the dog runs"], padding=True, return_tensors="pt")
    prompt = DeepPrompt(PromptSpec.for_backbone(shape_of(model.config), 5, init_std=0.5, shift_positions=False)).eval()
    with torch.no_grad():
        ours = run_encoder(model, dict(inputs), prompt)[0]
        expected = manual_forward(model, inputs["input_ids"], inputs["attention_mask"], prompt(2), shift=0)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(ours[real], expected[real], atol=1e-5)


def test_unshifted_roberta_positions_equal_the_models_own(tiny_roberta: Path) -> None:
    from promcse.backbone import unshifted_position_ids

    model = AutoModel.from_pretrained(str(tiny_roberta))
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    expected = model.embeddings.create_position_ids_from_input_ids(ids, 1, 0)
    assert torch.equal(unshifted_position_ids(model.config, ids, (ids != 1).long()), expected)
