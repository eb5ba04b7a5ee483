"""Deep prompt: parameter counts, shapes, init, dropout, masks and the reference's position shift."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from promcse.encoder.backbone import BackboneShape, position_limit, shape_of
from promcse.encoder.pooling import MLPHead
from promcse.encoder.prompt import DeepPrompt, PromptSpec, prefixed_attention_mask, run_encoder

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


def flat_prefix(layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> torch.Tensor:
    """Undo the per-layer split: (B, P, L*2*H) in the table's layout (inverse of the layout checked above)."""
    stacked = torch.stack([t for pair in layers for t in pair])  # (L*2, B, heads, P, head_dim)
    batch, length = stacked.shape[1], stacked.shape[3]
    return stacked.permute(1, 3, 0, 2, 4).reshape(batch, length, -1)


def test_prefix_dropout_at_the_default_rate() -> None:
    shape = BackboneShape("bert", num_layers=4, num_heads=4, hidden_size=64, vocab_size=100)
    spec = PromptSpec.for_backbone(shape, 16, init_std=1.0)
    assert spec.dropout == 0.1  # the reference's rate, by default
    p, rows = spec.dropout, 64
    torch.manual_seed(0)
    prompt = DeepPrompt(spec)
    table = prompt.table().detach()
    assert table.shape == (16, 512) and (table != 0).all()  # so a zero in the output is a dropped entry
    with torch.no_grad():
        prompt.train()
        out = flat_prefix(prompt(batch_size=rows))
        prompt.eval()
        evaluated = flat_prefix(prompt(batch_size=rows))
    dropped = out == 0
    n = dropped.numel()  # 64 * 16 * 512 = 524,288 entries
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma = 0.0021
    per_row = dropped.flatten(1).float().mean(1)
    assert (per_row - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / (n // rows))  # every row: 5 sigma = 0.017
    kept = table.expand(rows, -1, -1)[~dropped]
    # torch scales by the float 1/(1-p): bit-exact against that, and within an ulp of table / (1-p)
    assert torch.equal(out[~dropped], kept * (1 / (1 - p)))
    assert torch.allclose(out[~dropped], kept / (1 - p), rtol=2e-7, atol=0)
    # independent masks per row: no two rows alike, and two rows drop the same entry at rate p^2
    masks = dropped.flatten(1)
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == rows
    both = (masks[1:] & masks[:-1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / masks[1:].numel())
    # eval: no dropout, no scaling, every row the table itself
    assert torch.equal(evaluated, table.expand(rows, -1, -1))


def test_mask_has_prefix_ones_then_token_mask() -> None:
    mask = torch.tensor([[1, 1, 0]])
    additive = prefixed_attention_mask(mask, 2, torch.float32)
    assert additive.shape == (1, 1, 3, 5)
    visible = additive[0, 0, 0] == 0
    assert visible.tolist() == [True, True, True, True, False]


def manual_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                   prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...], shift: int = 0,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """Plain re-implementation of BERT (or RoBERTa: same layers) with prefix keys/values.

    Position ids are ``positions`` (B, T) when given, else BERT's: ``shift``, ``shift + 1``, ... in every row.
    """
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    emb = model.embeddings
    if positions is None:
        positions = torch.arange(shift, shift + ids.shape[1]).expand_as(ids)
    h = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(torch.zeros_like(ids))
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


def roberta_positions(mask: torch.Tensor, pad: int, shift: int) -> torch.Tensor:
    """RoBERTa's position ids, written out: the n-th real token of a row (n = 1, 2, ...) sits at
    ``pad + shift + n``, every pad token at ``pad``; so each row counts its own real tokens."""
    positions = torch.full_like(mask, pad)
    for row in range(mask.shape[0]):
        n = 0
        for column in range(mask.shape[1]):
            if mask[row, column]:
                n += 1
                positions[row, column] = pad + shift + n
    return positions


@pytest.mark.parametrize("shift_positions", [True, False])
def test_roberta_run_encoder_equals_manual_prefix_attention(tiny_roberta: Path, shift_positions: bool) -> None:
    model = AutoModel.from_pretrained(str(tiny_roberta)).eval()
    pad, length = model.config.pad_token_id, 5
    assert pad == 1
    # rows padded by different amounts (pad id 1), one on the left: RoBERTa's positions follow each row's pads
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 2], [0, 10, 11, 2, 1, 1, 1], [0, 12, 2, 1, 1, 1, 1], [1, 1, 0, 13, 14, 15, 2]])
    mask = (ids != pad).long()
    inputs = {"input_ids": ids, "attention_mask": mask}
    torch.manual_seed(0)
    spec = PromptSpec.for_backbone(shape_of(model.config), length, init_std=0.5, shift_positions=shift_positions)
    prompt = DeepPrompt(spec).eval()
    with torch.no_grad():
        ours = run_encoder(model, dict(inputs), prompt)[0]
        plain = run_encoder(model, dict(inputs), None)[0]
        shifted = manual_forward(model, ids, mask, prompt(4), positions=roberta_positions(mask, pad, length))
        unshifted = manual_forward(model, ids, mask, prompt(4), positions=roberta_positions(mask, pad, 0))
    assert roberta_positions(mask, pad, 0)[1].tolist() == [2, 3, 4, 5, 1, 1, 1]
    assert roberta_positions(mask, pad, length)[3].tolist() == [1, 1, 7, 8, 9, 10, 11]
    expected, other = (shifted, unshifted) if shift_positions else (unshifted, shifted)
    assert ours.shape == (4, 7, 32)
    assert torch.allclose(ours, expected, atol=1e-5)  # every position, pad rows' too
    real = mask.bool()
    assert not torch.allclose(ours[real], other[real], atol=1e-3), "the test must see the shift setting"
    assert not torch.allclose(ours[real], plain[real], atol=1e-3), "the test must see the prefix"


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
    from promcse.encoder.backbone import unshifted_position_ids

    model = AutoModel.from_pretrained(str(tiny_roberta))
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    expected = model.embeddings.create_position_ids_from_input_ids(ids, 1, 0)
    assert torch.equal(unshifted_position_ids(model.config, ids, (ids != 1).long()), expected)
