"""Config loading: YAML + overrides, type checks, unknown keys with suggestions, impossible combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from promcse.training.config import load_config, save_config
from promcse.errors import PromcseError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  prompt_length: 12\ntrain:\n  lr: 0.03\n")
    config = load_config(path, ["train.lr=1e-3", "model.pooler=cls", "train.epochs=2"])
    assert config.model.prompt_length == 12
    assert config.train.lr == pytest.approx(1e-3)
    assert config.model.pooler == "cls" and config.train.epochs == 2


def test_saved_config_loads_back_identically(tmp_path: Path) -> None:
    config = load_config(None, ["loss.name=nt_xent_eh", "model.prompt_length=7"])
    save_config(config, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "text,match",
    [
        ("train:\n  lrr: 0.1\n", "did you mean 'lr'"),
        ("trian:\n  lr: 0.1\n", "did you mean 'train'"),
        ("train:\n  batch_size: big\n", "expected int"),
        ("train:\n  lr: [1, 2]\n", "expected float"),
        ("model:\n  prompt_projection: 3\n", "expected bool"),
        ("model:\n  mode: prompt\n  prompt_length: 0\n", "prompt mode needs prompt_length > 0"),
        ("loss:\n  name: triplet\n", "must be one of"),
        ("train:\n  batch_size: 1\n", "at least 2 rows"),
        ("train: [1, 2]\n", "section must be a mapping"),
        ("model: {backbone: [\n", "invalid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(PromcseError, match=match) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    if "YAML" not in match and "prompt mode" not in match and "one of" not in match and "rows" not in match:
        assert "c.yaml" in message


def test_bad_override_is_rejected() -> None:
    with pytest.raises(PromcseError, match="section.key=value"):
        load_config(None, ["lr"])
    with pytest.raises(PromcseError, match="did you mean 'temperature'"):
        load_config(None, ["loss.temprature=0.1"])


def test_every_shipped_config_loads() -> None:
    root = Path(__file__).parents[1]
    paths = sorted((root / "configs").glob("*.yaml")) + sorted((root / "experiments" / "configs").glob("*.yaml"))
    paths.append(root / "src" / "promcse" / "resources" / "quickstart.yaml")
    assert len(paths) > 10
    for path in paths:
        load_config(path)


@pytest.mark.parametrize(
    "overrides,key,match",
    [
        (["model.pooler=mean"], "model.pooler", "unknown pooler 'mean'"),
        (["model.head=sometimes"], "model.head", "unknown head mode"),
        (["model.pooler=cls_before_pooler", "model.head=always"], "model.head", "without the MLP head"),
        (["model.pooler=cls_before_pooler", "model.head=train_only"], "model.head", "without the MLP head"),
        (["loss.name=simcse"], "loss.name", "must be one of nt_xent, nt_xent_eh, supcon"),
        (["loss.name=supcon", "loss.tile_size=8"], "loss.tile_size", "supcon is dense"),
        (["loss.name=supcon", "loss.hard_negative_weight=1"], "loss.hard_negative_weight", "no hard-negative bonus"),
        (["model.prompt_dropout=1.0"], "model.prompt_dropout", "must be in"),
        (["loss.eh_weight=-1"], "loss.eh_weight", "must be >= 0"),
        (["data.max_length=1"], "data.max_length", "must be >= 2"),
        (["train.log_every=0"], "train.log_every", "must be >= 1"),
        (["train.lr=.nan"], "train.lr", "must be a finite number"),
    ],
)
def test_validate_checks_every_choice_before_any_model_loads(overrides: list[str], key: str, match: str) -> None:
    with pytest.raises(PromcseError, match=match) as info:
        load_config(None, overrides)
    assert info.value.key == key


@pytest.mark.parametrize("loss", [["loss.name=nt_xent_eh"], ["loss.name=nt_xent", "loss.hard_negative_weight=1.0"]])
@pytest.mark.parametrize("kind", ["txt", "pairs"])
def test_data_without_hard_negatives_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss: list[str], kind: str
) -> None:
    import promcse.training.train

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone must not load before the data is checked")

    monkeypatch.setattr(promcse.training.train, "load_backbone", no_model)
    if kind == "txt":
        data = tmp_path / "train.txt"
        data.write_text("".join(f"sentence number {i}\n" for i in range(8)), encoding="utf-8")
    else:
        data = tmp_path / "pairs.csv"
        data.write_text("sent0,sent1\n" + "".join(f"a {i},b {i}\n" for i in range(8)), encoding="utf-8")
    config = load_config(None, [f"data.train_file={data}", "train.batch_size=4", *loss])
    with pytest.raises(PromcseError, match="hard negative|hard_neg") as info:
        promcse.training.train.train(config, tmp_path / "out", show_progress=False)
    assert str(data) in str(info.value)
