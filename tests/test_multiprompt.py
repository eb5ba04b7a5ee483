"""Mixed-prompt forward: every row of a batch that mixes prompts equals its own model's encode (<= 1e-5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_prompt_checkpoint, make_sentences
from promcse.encoder.multiprompt import build_bank, encode_mixed
from promcse.serving.registry import PromptRegistry

# (name, checkpoint options): P = 5 / 20, projection MLP, shift true and false, head none / always
PROMPTS = {
    "p5-shift-cls": dict(length=5, shift_positions=True, pooler="cls", head="always"),
    "p20-noshift-avg": dict(length=20, shift_positions=False, pooler="avg", head="none"),
    "p5-proj-noshift": dict(length=5, projection=True, shift_positions=False, pooler="avg_first_last", head="none"),
    "p20-proj-shift-head": dict(length=20, projection=True, shift_positions=True, pooler="avg", head="always"),
}


@pytest.fixture(scope="module")
def registry(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptRegistry:
    root = tmp_path_factory.mktemp("mixed")
    reg = PromptRegistry(device="cpu")
    for i, (name, options) in enumerate(PROMPTS.items()):
        reg.add(name, make_prompt_checkpoint(tiny_bert, root / name, seed=i, **options))  # type: ignore[arg-type]
    reg.add("bare", str(tiny_bert))  # the frozen backbone itself, no prompt
    reg.add("full", make_prompt_checkpoint(tiny_bert, root / "full", seed=9, mode="full", length=0))
    return reg


def mixed_texts(n: int) -> list[str]:
    short = make_sentences(n, seed=4)
    return [t if i % 3 else " ".join([t] * 8) for i, t in enumerate(short)]  # some far longer than others


def test_every_row_equals_its_own_models_encode(registry: PromptRegistry) -> None:
    names = registry.names
    assert len(registry.backbones) == 1  # the prompts and the bare backbone share one module; "full" has its own
    texts = mixed_texts(40)
    chosen = [names[(i * 7) % len(names)] for i in range(len(texts))]
    got = encode_mixed([registry.get(n) for n in chosen], texts, batch_size=8, normalize=False)
    for name in names:
        rows = [i for i, n in enumerate(chosen) if n == name]
        want = registry.get(name).encode([texts[i] for i in rows], batch_size=8, normalize=False)
        assert np.abs(got[rows] - want).max() <= 1e-5, name


def test_normalized_and_single_prompt_batches(registry: PromptRegistry) -> None:
    texts = mixed_texts(9)
    encoder = registry.get("p20-noshift-avg")
    got = encode_mixed([encoder] * len(texts), texts, batch_size=4)
    assert np.abs(got - encoder.encode(texts, batch_size=4, normalize_embeddings=True)).max() <= 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bank_pads_shorter_prompts_and_masks_them(registry: PromptRegistry) -> None:
    members = [registry.get(n) for n in ("p5-shift-cls", "p20-noshift-avg", "bare")]
    bank = build_bank(members)
    assert bank.table is not None and tuple(bank.table.shape[:2]) == (3, 20)
    assert bank.lengths.tolist() == [5, 20, 0] and bank.shifts.tolist() == [5, 0, 0]
    assert torch.count_nonzero(bank.table[0, 5:]) == 0 and torch.count_nonzero(bank.table[2]) == 0
    with pytest.raises(ValueError, match="one shared backbone"):
        build_bank(members + [registry.get("full")])


def test_registry_encode_rows_uses_cached_banks(registry: PromptRegistry, tiny_bert: Path, tmp_path: Path) -> None:
    texts = mixed_texts(12)
    names = [registry.names[i % len(registry.names)] for i in range(len(texts))]
    got = registry.encode_rows(texts, names, batch_size=5)
    for i, (text, name) in enumerate(zip(texts, names)):
        want = registry.get(name).encode([text], normalize=False)[0]
        assert np.abs(got[i] - want).max() <= 1e-5, name
    bank, _ = registry.bank_of("bare")
    assert registry.bank_of("p5-shift-cls")[0] is bank  # built once, shared by the backbone's models
    registry.add("late", make_prompt_checkpoint(tiny_bert, tmp_path / "late", seed=11, length=3))
    assert registry.bank_of("late")[0] is not bank and registry.bank_of("late")[0].table.shape[0] == 6
