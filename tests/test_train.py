"""Training loop on a tiny BERT: frozen backbone stays bit-identical, the prompt learns, logs are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from promcse.models.checkpoint import load_checkpoint
from promcse.training.config import load_config
from promcse.io.data import batch_order
from promcse.training.train import train


def tiny_config(tiny_bert: Path, data: dict[str, Path], *extra: str):
    return load_config(None, [
        f"model.backbone={tiny_bert}", "model.prompt_length=4", f"data.train_file={data['csv']}",
        f"data.eval_data_dir={data['data_dir']}", "train.batch_size=8", "train.max_steps=4",
        "train.eval_every=2", "train.log_every=1", "train.lr=0.05", *extra,
    ])


def fresh_encoder(tiny_bert: Path, config):
    """The encoder ``train`` would build for ``config``, built here so the test holds the in-memory objects."""
    from promcse.encoder.backbone import load_backbone
    from promcse.encoder.model import build_encoder
    from promcse.training.train import encoder_spec

    backbone, tokenizer = load_backbone(str(tiny_bert))
    torch.manual_seed(config.train.seed)
    return build_encoder(encoder_spec(config.model, backbone), backbone, tokenizer)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Cloned copies of every tensor of ``module`` (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_tensors(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of ``module`` that are not bit-identical to the snapshot ``before``."""
    after = module.state_dict()
    assert list(after) == list(before), "the module's set of tensors changed"
    return [k for k in before if not torch.equal(before[k], after[k])]


def test_prompt_training_keeps_backbone_bit_identical(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(tiny_bert, tiny_data, "loss.name=nt_xent_eh")
    encoder = fresh_encoder(tiny_bert, config)
    backbone = encoder.backbone
    backbone_before, prompt_before = snapshot(backbone), snapshot(encoder.prompt)
    result = train(config, tmp_path / "run", show_progress=False, encoder=encoder)
    assert encoder.backbone is backbone  # the very object that was trained on, not a reload from disk
    assert changed_tensors(backbone, backbone_before) == []
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters()), "no gradient reached it"
    assert changed_tensors(encoder.prompt, prompt_before) == ["embedding.weight"]  # while the prompt learned
    assert result.steps == 4 and len(result.history) == 2
    assert load_checkpoint(tmp_path / "run").prompt is not None
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("energy_hinge" in l for l in lines) and any("stsb_dev" in l for l in lines)
    assert (tmp_path / "run" / "run_config.yaml").is_file()


def test_backbone_change_detector_catches_a_leak(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """The check above can fail: one backbone weight unfrozen on purpose is found, and only that one."""
    config = tiny_config(tiny_bert, tiny_data, "train.eval_every=-1", "train.max_steps=1")
    encoder = fresh_encoder(tiny_bert, config)
    leak = "encoder.layer.0.attention.self.query.weight"
    dict(encoder.backbone.named_parameters())[leak].requires_grad_(True)
    before = snapshot(encoder.backbone)
    train(config, tmp_path / "run", show_progress=False, encoder=encoder)
    assert changed_tensors(encoder.backbone, before) == [leak]
    # and it is bit-exact: a one-ulp change of a single element is seen
    before = snapshot(encoder.backbone)
    weight = encoder.backbone.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))
    assert changed_tensors(encoder.backbone, before) == ["embeddings.word_embeddings.weight"]


def test_training_changes_the_prompt(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(tiny_bert, tiny_data, "train.eval_every=-1", f"data.train_file={tiny_data['txt']}")
    encoder = fresh_encoder(tiny_bert, config)
    initial = encoder.prompt.embedding.weight.detach().clone()
    train(config, tmp_path / "run", show_progress=False, encoder=encoder)
    assert not torch.equal(initial, encoder.prompt.embedding.weight.detach())


def test_full_mode_updates_backbone(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(tiny_bert, tiny_data, "model.mode=full", "model.prompt_length=0", "train.lr=1e-3")
    train(config, tmp_path / "full", show_progress=False)
    loaded = load_checkpoint(tmp_path / "full")
    from promcse.encoder.backbone import load_backbone

    original = load_backbone(str(tiny_bert))[0].state_dict()
    changed = [k for k, v in loaded.backbone.state_dict().items() if not torch.equal(v, original[k])]
    assert changed


def test_same_seed_same_result(tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(tiny_bert, tiny_data, "train.eval_every=-1")
    train(config, tmp_path / "a", show_progress=False)
    train(config, tmp_path / "b", show_progress=False)
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert torch.equal(a.prompt.embedding.weight, b.prompt.embedding.weight)


def test_batch_order_covers_every_row_once_per_epoch() -> None:
    batches = batch_order(10, 4, 2, seed=1)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(batches[:3]).tolist()) == list(range(10))


def test_truncation_is_counted_and_reported(tiny_bert: Path) -> None:
    from promcse.encoder.backbone import load_backbone
    from promcse.io.data import TrainExamples
    from promcse.training.train import report_truncation

    _, tokenizer = load_backbone(str(tiny_bert))
    examples = TrainExamples(["a man", "a man " * 40, "the dog " * 3], None, (), "x")
    note = report_truncation(tokenizer, examples, max_length=8)
    assert note is not None and "1 of 3 training texts" in note
    assert report_truncation(tokenizer, examples, max_length=200) is None


def test_encode_warns_once_about_truncated_texts(tiny_bert: Path) -> None:
    import pytest

    from test_model import make

    encoder = make(tiny_bert)
    with pytest.warns(UserWarning, match="1 of 2 texts reached the"):
        encoder.encode(["a man", "a man " * 80])


def test_second_run_into_the_same_directory_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    from promcse.errors import PromcseError
    from promcse.io.files import directory_lock

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom promcse.io.files import directory_lock\n"
                               f"with directory_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PromcseError, match=rf"already writing here \(pid {holder.pid}\)"):
            with directory_lock(out, "promcse train"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with directory_lock(out):  # released when its holder died
        pass
