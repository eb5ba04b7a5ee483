"""Several training sources in one run: homogeneous batches drawn by weight, config checks, a mixed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import write_tiny_bert
from promcse.training.config import load_config, save_config
from promcse.io.data import TrainExamples
from promcse.errors import PromcseError
from promcse.io.sources import Mixture, mixture_batch_order
from promcse.training.train import train
from test_train import tiny_config


def _mixture(sizes, weights, contrastive=None):
    parts = tuple(TrainExamples([f"s{k}-{i}" for i in range(n)], None, (), f"f{k}") for k, n in enumerate(sizes))
    return Mixture(parts, tuple(weights), tuple(contrastive or [True] * len(sizes)))


def test_every_batch_comes_from_one_source_in_the_stated_ratio():
    mixture = _mixture([300, 90], [3.0, 1.0])
    batches = mixture_batch_order(mixture, batch_size=10, epochs=2, seed=0)
    assert len(batches) == 2 * (30 + 9)
    parts = [mixture.part_of(rows) for rows in batches]
    share = parts.count(0) / len(parts)
    assert 0.6 < share < 0.9  # 0.75 expected
    for rows, k in zip(batches, parts):  # views come from the batch's own source
        assert all(text.startswith(f"s{k}-") for text in mixture.views(rows)[0])
    # source 1 (weight 1/4 of 78 steps, 9 batches per pass) is cycled through without repeating a row in a pass
    first = np.concatenate([rows for rows, k in zip(batches, parts) if k == 1][:9])
    assert len(set(first.tolist())) == 90
    assert [b.tolist() for b in batches] == [b.tolist() for b in mixture_batch_order(mixture, 10, 2, 0)]


def test_rows_of_two_sources_in_one_batch_are_refused():
    mixture = _mixture([5, 5], [1.0, 1.0])
    with pytest.raises(ValueError, match="spans sources"):
        mixture.views(np.array([4, 5]))


def test_sources_round_trip_through_the_saved_config(tmp_path):
    config = load_config(None, ["data.sources=[{file: a.txt, weight: 2}, {file: b.csv, contrastive: false}]",
                                "loss.distill_teacher=minilm"])
    save_config(config, tmp_path / "run.yaml")
    again = load_config(tmp_path / "run.yaml")
    assert again.data.sources == config.data.sources
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["data"]["sources"][1]["contrastive"] is False


@pytest.mark.parametrize("value,key", [
    ("[{file: a.txt, wieght: 2}]", "data.sources[0].wieght"),
    ("[{file: a.txt, weight: 0}]", "data.sources"),
    ("[{file: a.txt, contrastive: false}]", "data.sources"),  # distillation-only source without a teacher
    ("a.txt", "data.sources"),
])
def test_bad_sources_name_the_key(value, key):
    with pytest.raises(PromcseError) as err:
        load_config(None, [f"data.sources={value}"])
    assert err.value.key == key


def test_a_run_over_sentences_triplets_and_distillation_texts(tiny_bert, tiny_data, tmp_path):
    teacher = write_tiny_bert(tmp_path / "teacher", hidden=48, seed=3)
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(f"extra sentence number {i}" for i in range(20)) + "\n", encoding="utf-8")
    sources = (f"[{{file: '{tiny_data['txt']}', weight: 1}}, {{file: '{tiny_data['csv']}', weight: 1}}, "
               f"{{file: '{extra}', weight: 1, contrastive: false}}]")
    config = tiny_config(tiny_bert, tiny_data, f"data.sources={sources}", "loss.name=nt_xent_eh",
                         f"loss.distill_teacher={teacher}", "train.max_steps=12", "train.eval_every=-1")
    result = train(config, tmp_path / "run", show_progress=False)
    assert result.steps == 12
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kinds = {("nt_xent" in l, "energy_hinge" in l) for l in lines}
    assert (False, False) in kinds and (True, True) in kinds  # distillation-only and contrastive steps both ran
    assert all("distill" in l for l in lines)
