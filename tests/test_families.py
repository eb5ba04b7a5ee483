"""Every family in FAMILIES: a prompt changes the output (or is refused clearly), a text at the limit encodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAMILY_TYPES, make_prompt_checkpoint
from promcse.encoder.backbone import FAMILIES, PREFIX_FAMILIES, load_backbone, position_limit
from promcse.errors import PromcseError
from promcse.models.loading import load

TEXTS = ["a man is playing a guitar .", "two dogs run on the beach", "the child reads a book"]


def test_fixture_covers_every_family() -> None:
    assert set(FAMILY_TYPES) == set(FAMILIES)


def limit_text(words: int) -> str:
    return " ".join(["dog"] * words)


@pytest.mark.parametrize("model_type", [t for t in FAMILY_TYPES if t in PREFIX_FAMILIES])
@pytest.mark.parametrize("shift", [True, False])
def test_prompt_changes_output_and_limit_text_encodes(tiny_family, tmp_path: Path, model_type: str, shift: bool) -> None:
    backbone_dir = tiny_family(model_type)
    ckpt = make_prompt_checkpoint(backbone_dir, tmp_path / "ckpt", length=3, shift_positions=shift)
    prompted, frozen = load(ckpt, device="cpu"), load(str(backbone_dir), device="cpu")
    a, b = prompted.encode(TEXTS, normalize=False), frozen.encode(TEXTS, normalize=False)
    assert np.abs(a - b).max() > 1e-3, "the prefix must change the output"
    limit = position_limit(prompted.backbone.config)
    assert prompted.max_length == (limit - 3 if shift else limit)
    exact = limit_text(prompted.max_length - 2)  # + [CLS] and [SEP] = exactly the limit
    assert len(prompted.tokenizer(exact)["input_ids"]) == prompted.max_length
    with pytest.warns(UserWarning, match="truncated"):
        out = prompted.encode([exact, limit_text(500), "short one"], normalize=False)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("model_type", [t for t in FAMILY_TYPES if t not in PREFIX_FAMILIES])
def test_family_without_cache_refuses_a_prompt_and_encodes_frozen(tiny_family, tmp_path: Path, model_type: str) -> None:
    backbone_dir = tiny_family(model_type)
    with pytest.raises(PromcseError, match=f"'{model_type}' cannot take a deep prompt.*bert"):
        make_prompt_checkpoint(backbone_dir, tmp_path / "ckpt", length=3)
    frozen = load(str(backbone_dir), device="cpu")
    limit = position_limit(frozen.backbone.config)
    assert frozen.max_length == limit
    exact = limit_text(limit - 2)
    assert len(frozen.tokenizer(exact)["input_ids"]) == limit
    with pytest.warns(UserWarning, match="truncated"):
        out = frozen.encode([exact, limit_text(500), "short one"], normalize=False)
    assert np.isfinite(out).all()


def test_mpnet_position_limit_counts_from_the_pad_id(tiny_family) -> None:
    backbone, _ = load_backbone(str(tiny_family("mpnet")))
    assert position_limit(backbone.config) == 66 - 2  # positions start at pad_token_id + 1 = 2


def test_unknown_family_is_refused_before_weights_load(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}), encoding="utf-8")
    with pytest.raises(PromcseError, match="'gpt2' is not supported; supported families: bert"):
        load_backbone(str(tmp_path))


def test_checkpoint_of_refused_family_is_rejected_at_load(tiny_family, tiny_bert: Path, tmp_path: Path) -> None:
    """A checkpoint whose config claims a prompt on DistilBERT fails cleanly at load, naming the family."""
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt", length=2)
    meta = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    meta["encoder"]["backbone"] = str(tiny_family("distilbert"))
    meta["encoder"]["shape"]["model_type"] = "distilbert"
    (ckpt / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(PromcseError, match="'distilbert' cannot take a deep prompt"):
        load(ckpt, device="cpu")
