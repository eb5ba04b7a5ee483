"""Encoder: every pooler with a prefix, heads, trainable sets, checkpoints (round trip, size, mismatches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_tiny_bert
from promcse.encoder.backbone import load_backbone, shape_of
from promcse.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from promcse.errors import PromcseError
from promcse.encoder.model import EncoderSpec, build_encoder
from promcse.encoder.pooling import POOLERS
from promcse.encoder.prompt import PromptSpec, run_encoder

TEXTS = ["a man is playing guitar", "the dog runs in the park with a ball", "two women are eating"]


def make(tiny_bert: Path, pooler: str = "avg", head: str = "none", length: int = 4, mode: str = "prompt",
         projection: bool = False):
    backbone, tokenizer = load_backbone(str(tiny_bert))
    shape = shape_of(backbone.config)
    prompt = PromptSpec.for_backbone(shape, length, projection=projection, projection_hidden=16) if length else None
    spec = EncoderSpec(str(tiny_bert), shape, mode=mode, prompt=prompt, pooler=pooler, head=head)
    torch.manual_seed(0)
    return build_encoder(spec, backbone, tokenizer)


@pytest.mark.parametrize("pooler", sorted(POOLERS))
def test_every_pooler_ignores_padding_and_prefix(tiny_bert: Path, pooler: str) -> None:
    encoder = make(tiny_bert, pooler=pooler).eval()
    alone = encoder.encode(TEXTS[:1])
    padded = encoder.encode(TEXTS[:2], batch_size=2)[:1]  # batched with a longer text -> padding
    assert alone.shape == (1, 32)
    assert np.allclose(alone, padded, atol=1e-5)


def test_avg_first_last_uses_first_transformer_layer(tiny_bert: Path) -> None:
    encoder = make(tiny_bert, pooler="avg_first_last").eval()
    inputs = encoder.tokenize(TEXTS[:1])
    with torch.no_grad():
        states = run_encoder(encoder.backbone, inputs, encoder.prompt, output_hidden_states=True)
        expected = (states[1].mean(1) + states[-1].mean(1)) / 2  # no padding in a single text
        got = encoder(inputs)
    assert torch.allclose(got, expected, atol=1e-6)
    assert len(states) == 3  # embeddings + 2 layers: [1] is the first transformer layer


def test_train_only_head_applies_only_in_training(tiny_bert: Path) -> None:
    encoder = make(tiny_bert, pooler="cls", head="train_only")
    inputs = encoder.tokenize(TEXTS)
    encoder.prompt.dropout.p = 0.0
    for module in encoder.backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    encoder.train()
    with torch.no_grad():
        trained = encoder(inputs)
        encoder.eval()
        evaluated = encoder(inputs)
    assert torch.allclose(trained, encoder.head(evaluated), atol=1e-6)


def test_prompt_mode_trains_only_prompt_and_head(tiny_bert: Path) -> None:
    encoder = make(tiny_bert, pooler="cls", head="always")
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("prompt.", "head.")) for n in names)
    full = make(tiny_bert, mode="full", length=0)
    assert all(p.requires_grad for p in full.backbone.parameters())


@pytest.mark.parametrize("projection,head", [(False, "none"), (True, "always")])
def test_checkpoint_round_trip_gives_identical_embeddings(tiny_bert: Path, tmp_path: Path, projection: bool, head: str) -> None:
    encoder = make(tiny_bert, pooler="cls" if head != "none" else "avg", head=head, projection=projection).eval()
    save_checkpoint(encoder, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / WEIGHTS_FILE).stat().st_size < 1_000_000
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert np.array_equal(encoder.encode(TEXTS), loaded.encode(TEXTS))


def test_full_mode_checkpoint_keeps_its_backbone(tiny_bert: Path, tmp_path: Path) -> None:
    encoder = make(tiny_bert, mode="full", length=0)
    with torch.no_grad():
        next(encoder.backbone.parameters()).add_(0.5)  # pretend fine-tuning changed it
    save_checkpoint(encoder, tmp_path / "full")
    loaded = load_checkpoint(tmp_path / "full")
    assert np.allclose(encoder.encode(TEXTS), loaded.encode(TEXTS), atol=1e-6)


def test_checkpoint_against_other_backbone_shape_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    encoder = make(tiny_bert)
    save_checkpoint(encoder, tmp_path / "ckpt")
    other = write_tiny_bert(tmp_path / "wider", hidden=48, heads=4)
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    config["encoder"]["backbone"] = str(other)
    (tmp_path / "ckpt" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PromcseError, match="hidden_size: checkpoint 32 vs backbone 48"):
        load_checkpoint(tmp_path / "ckpt")


def test_checkpoint_with_wrong_prompt_length_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    save_checkpoint(make(tiny_bert, length=4), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    config["encoder"]["prompt"]["length"] = 6
    (tmp_path / "ckpt" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PromcseError, match=r"shape \(4, 128\).*\(6, 128\)"):
        load_checkpoint(tmp_path / "ckpt")


def test_unknown_pooler_in_checkpoint_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    save_checkpoint(make(tiny_bert), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    config["encoder"]["pooler"] = "max"
    (tmp_path / "ckpt" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PromcseError, match="unknown pooler 'max'"):
        load_checkpoint(tmp_path / "ckpt")


def test_encode_restores_input_order(tiny_bert: Path) -> None:
    encoder = make(tiny_bert).eval()
    texts = TEXTS + ["a cat", "the big red car is on the street near the beach"]
    together = encoder.encode(texts, batch_size=2)
    one_by_one = np.concatenate([encoder.encode([t]) for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-5)


def test_head_and_projection_mlp_use_the_reference_init() -> None:
    """The reference's cl_init ends with init_weights(): every nn.Linear N(0, 0.02), bias 0 (not PyTorch's default)."""
    from promcse.encoder.pooling import MLPHead
    from promcse.encoder.prompt import DeepPrompt, PromptSpec

    torch.manual_seed(0)
    head = MLPHead(64)
    prompt = DeepPrompt(PromptSpec(length=4, num_layers=2, num_heads=4, hidden_size=64, projection=True,
                                   projection_hidden=96))
    linears = [head.dense, prompt.trans[0], prompt.trans[2]]  # type: ignore[index]
    for linear in linears:
        assert torch.count_nonzero(linear.bias) == 0
        std = float(linear.weight.std())
        assert 0.0185 < std < 0.0215, std  # PyTorch's default here would be 1/sqrt(3 * fan_in) = 0.07 / 0.06
        assert abs(float(linear.weight.mean())) < 0.002
    assert 0.0185 < float(prompt.embedding.weight.std()) < 0.0215
