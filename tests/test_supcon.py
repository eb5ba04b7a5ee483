"""SupCon from labels (``loss.name: supcon``): the ``label`` column, the objective against a loop reference, the
labels a training step sees, and a training run on a tiny BERT (backbone frozen, prompt learns)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import promcse.objectives.objective as objective_module
from conftest import make_sentences
from promcse.training.config import load_config
from promcse.io.data import read_training_file
from promcse.training.distributed import DistContext
from promcse.errors import PromcseError
from promcse.training.config import build_objective
from promcse.training.step import global_loss
from promcse.training.train import train
from test_train import changed_tensors, fresh_encoder, snapshot, tiny_config


def _loop_supcon(z: list[torch.Tensor], labels: list[int], tau: float) -> torch.Tensor:
    """SupCon L_out with plain Python loops: anchor i, positives p != i of its label, denominator a != i."""
    unit = [v / v.norm() for v in z]
    total, count = torch.zeros(()), 0
    for i in range(len(unit)):
        positives = [p for p in range(len(unit)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        logits = {a: torch.dot(unit[i], unit[a]) / tau for a in range(len(unit)) if a != i}
        log_denominator = torch.logsumexp(torch.stack(list(logits.values())), dim=0)
        total = total - sum(logits[p] - log_denominator for p in positives) / len(positives)
        count += 1
    return total / count


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_label_column_is_read_with_ids_by_first_appearance(tmp_path: Path) -> None:
    plain = read_training_file(_write(tmp_path / "l.csv", ["sent0,label", "a dog,animal", "a car,vehicle",
                                                            "a cat,animal"]))
    assert plain.positive is None  # no sent1: the positive is a dropout view
    assert plain.labels == (0, 1, 0) and plain.label_names == ("animal", "vehicle")
    assert plain.labels_of(np.array([2, 1])).tolist() == [0, 1]
    paired = read_training_file(_write(tmp_path / "p.tsv", ["label\tsent0\tsent1", "x\ta\tb", "y\tc\td"]))
    assert paired.positive == ["b", "d"] and paired.labels == (0, 1)
    jsonl = read_training_file(_write(tmp_path / "j.jsonl", ['{"sent0": "a", "label": 3}', '{"sent0": "b", "label": 3}']))
    assert jsonl.labels == (0, 0) and jsonl.label_names == ("3",)
    assert read_training_file(_write(tmp_path / "n.csv", ["sent0,sent1", "a,b"])).labels is None


@pytest.mark.parametrize("lines,line", [
    (["sent0,label", "a,x", "b,  "], 3),
    (['{"sent0": "a", "label": "x"}', '{"sent0": "b", "label": true}'], 2),
    (['{"sent0": "a", "label": 1.5}'], 1),
])
def test_a_bad_label_names_file_line_and_column(tmp_path: Path, lines: list[str], line: int) -> None:
    path = _write(tmp_path / ("bad.jsonl" if lines[0].startswith("{") else "bad.csv"), lines)
    with pytest.raises(PromcseError, match=rf"bad\.\w+, line {line}, column label: missing or empty label"):
        read_training_file(path)


def test_objective_matches_the_loop_reference_with_and_without_negatives() -> None:
    torch.manual_seed(0)
    objective = build_objective(load_config(None, ["loss.name=supcon", "loss.temperature=0.1"]).loss)
    anchor, positive, negative = (torch.randn(5, 8, requires_grad=True) for _ in range(3))
    labels = torch.tensor([0, 1, 0, 2, 1])
    got = objective([anchor, positive], labels=labels)
    want = _loop_supcon(list(anchor) + list(positive), labels.tolist() * 2, 0.1)
    assert set(got) == {"supcon", "loss"} and torch.allclose(got["loss"], want, atol=1e-5)
    grad_got = torch.autograd.grad(got["loss"], anchor)[0]
    grad_want = torch.autograd.grad(_loop_supcon(list(anchor) + list(positive), labels.tolist() * 2, 0.1), anchor)[0]
    assert torch.allclose(grad_got, grad_want, atol=1e-5)
    # hard negatives join with labels of their own: in the denominators, never a positive
    with_negative = objective([anchor, positive, negative], labels=labels)["loss"]
    fresh = list(range(3, 8))
    assert torch.allclose(with_negative, _loop_supcon(list(anchor) + list(positive) + list(negative),
                                                      labels.tolist() * 2 + fresh, 0.1), atol=1e-5)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        objective([anchor, positive])


def test_the_step_loss_takes_the_given_labels() -> None:
    torch.manual_seed(1)
    objective = build_objective(load_config(None, ["loss.name=supcon"]).loss)
    views = [torch.randn(4, 6), torch.randn(4, 6)]
    one_process = DistContext()
    for labels in ([0, 0, 1, 1], [0, 1, 2, 3]):
        got = global_loss(objective, one_process, labels=torch.tensor(labels))(views)["loss"]
        assert math.isclose(float(got), float(_loop_supcon(views[0].unbind() + views[1].unbind(), labels * 2, 0.05)),
                            rel_tol=1e-5)


def _labelled_file(tmp_path: Path, n: int = 40) -> tuple[Path, list[int]]:
    sentences = make_sentences(n, seed=5)
    labels = [i % 3 for i in range(n)]
    return _write(tmp_path / "labelled.csv", ["sent0,label"] + [f"{s},class{k}" for s, k in zip(sentences, labels)]), labels


def test_training_with_supcon_sees_each_batch_labels(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, labels = _labelled_file(tmp_path)
    config = tiny_config(tiny_bert, tiny_data, f"data.train_file={path}", "loss.name=supcon", "train.eval_every=-1")
    seen: list[list[int]] = []
    real = objective_module.supcon_views

    def spy(anchor, positive, negative=None, *, labels, temperature):
        seen.append(labels.tolist())
        return real(anchor, positive, negative, labels=labels, temperature=temperature)

    monkeypatch.setattr(objective_module, "supcon_views", spy)
    encoder = fresh_encoder(tiny_bert, config)
    backbone_before, prompt_before = snapshot(encoder.backbone), snapshot(encoder.prompt)
    result = train(config, tmp_path / "run", show_progress=False, encoder=encoder)
    from promcse.io.data import batch_order

    order = batch_order(len(labels), config.train.batch_size, config.train.epochs, config.train.seed)
    assert seen == [[labels[i] for i in rows] for rows in order[: result.steps]]
    assert changed_tensors(encoder.backbone, backbone_before) == []
    assert changed_tensors(encoder.prompt, prompt_before) == ["embedding.weight"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all("supcon" in line and math.isfinite(line["supcon"]) for line in logged)


def test_supcon_without_a_label_column_is_refused_before_training(tiny_bert: Path, tiny_data: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    config = tiny_config(tiny_bert, tiny_data, "loss.name=supcon")
    with pytest.raises(PromcseError, match=r"triplets\.csv, line 1: loss.name=supcon needs a 'label' column"):
        train(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_supcon_under_several_processes_is_refused(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import promcse.training.train as train_module

    path, _ = _labelled_file(tmp_path)
    monkeypatch.setattr(train_module, "setup", lambda device: DistContext(rank=0, world_size=2))
    config = tiny_config(tiny_bert, tiny_data, f"data.train_file={path}", "loss.name=supcon")
    with pytest.raises(PromcseError, match="key 'loss.name': loss.name=supcon runs on one process"):
        train(config, tmp_path / "run", show_progress=False)
