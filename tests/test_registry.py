"""Many prompts over one backbone: one shared module object, per-call prompt selection, same numbers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import promcse
from conftest import make_prompt_checkpoint, make_sentences
from promcse.errors import PromcseError
from promcse.serving.registry import PromptRegistry, backbone_key, load_many

TEXTS = make_sentences(12, seed=4)


@pytest.fixture(scope="module")
def checkpoints(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    # large random prompts and heads, so that different prompts give clearly different vectors
    return {f"p{i}": make_prompt_checkpoint(tiny_bert, root / f"p{i}", seed=i, pooler="cls", head="always")
            for i in range(3)}


def test_prompts_share_one_backbone_object(tiny_bert: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "same_backbone"
    os.symlink(tiny_bert, link)  # another spelling of the same directory shares too
    relinked = make_prompt_checkpoint(link, tmp_path / "relinked", seed=7, pooler="cls", head="always")
    registry = load_many({**checkpoints, "relinked": relinked, "bare": str(tiny_bert)}, device="cpu")
    backbones = {id(registry.get(name).backbone) for name in registry.names}
    assert len(backbones) == 1 and len(registry.backbones) == 1
    assert list(registry.backbones) == [backbone_key(str(tiny_bert))]
    assert all(not p.requires_grad for p in registry.get("p0").backbone.parameters())
    assert registry.names == ["p0", "p1", "p2", "relinked", "bare"]


def test_per_call_prompt_selection_matches_separate_loading(checkpoints: dict[str, Path]) -> None:
    registry = load_many(list(checkpoints.items()), device="cpu")
    outputs = {name: registry.encode(TEXTS, model=name) for name in registry.names}
    for name, path in checkpoints.items():
        alone = promcse.load(str(path), device="cpu").encode(TEXTS, normalize=True)
        assert np.allclose(outputs[name], alone, atol=1e-6)
    assert not np.allclose(outputs["p0"], outputs["p1"], atol=1e-3)  # the prompts really differ
    assert np.allclose(registry.encode(TEXTS), outputs["p0"])  # default: the first model
    sims = registry.similarity(TEXTS[:2], TEXTS[:3], model="p2")
    assert sims.shape == (2, 3) and np.allclose(sims, outputs["p2"][:2] @ outputs["p2"][:3].T, atol=1e-6)


def test_concurrent_calls_with_different_prompts(checkpoints: dict[str, Path]) -> None:
    registry = load_many(checkpoints, device="cpu")
    expected = {name: registry.encode(TEXTS, model=name) for name in registry.names}
    results: dict[tuple[str, int], np.ndarray] = {}

    def work(name: str, round_: int) -> None:
        results[(name, round_)] = registry.encode(TEXTS, model=name)

    threads = [threading.Thread(target=work, args=(n, r)) for r in range(3) for n in registry.names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.allclose(vec, expected[name], atol=1e-6) for (name, _), vec in results.items())


def test_full_mode_keeps_its_own_backbone(tiny_bert: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    full = make_prompt_checkpoint(tiny_bert, tmp_path / "full", seed=3, mode="full", length=0)
    registry = load_many({"p0": checkpoints["p0"], "full": full}, device="cpu")
    assert registry.get("full").backbone is not registry.get("p0").backbone
    assert len(registry.backbones) == 1  # the fine-tune's backbone is not shared


def test_errors_and_description(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    registry = PromptRegistry(device="cpu")
    with pytest.raises(PromcseError, match="no models"):
        registry.get()
    registry.add("p0", checkpoints["p0"])
    with pytest.raises(PromcseError, match="already registered"):
        registry.add("p0", checkpoints["p1"])
    with pytest.raises(PromcseError, match="unknown model 'nope'; available: p0"):
        registry.encode(["x"], model="nope")
    with pytest.raises(PromcseError, match="neither a promcse checkpoint"):
        registry.add("bad", tmp_path)
    facts = registry.describe("p0")
    assert facts["prompt_length"] == 4 and facts["prompt_parameters"] == 4 * 2 * 2 * 32 and facts["dim"] == 32
    assert registry.find(str(checkpoints["p0"])) == "p0" and registry.find("elsewhere") is None


def test_released_checkpoint_in_a_registry(tiny_bert: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import json

    from test_released import write_released

    write_released(tiny_bert, tmp_path / "rel")
    (tmp_path / "rel" / "promcse.json").write_text(json.dumps({"pooler": "cls"}))
    registry = load_many({"p0": checkpoints["p0"], "rel": tmp_path / "rel"}, device="cpu")
    assert registry.get("rel").spec.head == "always" and registry.encode(TEXTS, "rel").shape == (12, 32)
