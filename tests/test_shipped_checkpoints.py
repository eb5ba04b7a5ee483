"""The prompts shipped under checkpoints/ load with the bundled backbone and reproduce their STS-B test numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import promcse
from promcse.evaluation.sts import evaluate

CHECKPOINTS = sorted((Path(__file__).parents[1] / "checkpoints").glob("*/config.json"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CHECKPOINTS, ids=[c.parent.name for c in CHECKPOINTS])
def test_shipped_checkpoint_reproduces_its_stsb_number(config: Path) -> None:
    directory = config.parent
    assert (directory / "prompt.safetensors").stat().st_size < 1_000_000
    recorded = json.loads((directory / "results.json").read_text())["tasks"]["STSBenchmark"]["spearman"]
    encoder = promcse.load(str(directory), device="cpu")
    result = evaluate(lambda t: encoder.encode(t, batch_size=128), ["stsb"], None, alignment_uniformity=False)
    assert result["tasks"]["STSBenchmark"]["spearman"] == pytest.approx(recorded, abs=0.01)


def test_two_prompts_are_shipped() -> None:
    assert len(CHECKPOINTS) >= 2
