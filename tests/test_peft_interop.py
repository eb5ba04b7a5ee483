"""PEFT interop, both ways: a promcse prompt exported as a PEFT prefix-tuning adapter gives the same vectors under
``PeftModel``, and a PEFT-trained prefix loads with ``promcse.load`` (and serves) with PEFT's vectors. Tiny random
BERT/RoBERTa only; PEFT's vectors are the mean over the real tokens of its ``last_hidden_state``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import promcse
import promcse.cli
from conftest import make_prompt_checkpoint, write_tiny_bert
from promcse.encoder.backbone import shape_of
from promcse.encoder.model import EncoderSpec
from promcse.encoder.prompt import PromptSpec
from promcse.errors import PromcseError
from promcse.export.peft import export_peft, peft_refusal
from promcse.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

peft = pytest.importorskip("peft")

TEXTS = ["a man is playing guitar", "the dog runs in the park with a red ball", "two women are eating food",
         "a child"]


def peft_vectors(adapter: Path, texts: list[str]) -> np.ndarray:
    """What a PEFT user computes: ``PeftModel`` over the recorded base model, mean over the real tokens."""
    base = json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(adapter)).eval()
    batch = AutoTokenizer.from_pretrained(base)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def train_peft_prefix(base: Path, out: Path, projection: bool = False, steps: int = 3) -> Path:
    """A prefix trained by PEFT itself (a few Adam steps on random tokens), saved with ``save_pretrained``."""
    torch.manual_seed(0)
    config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3,
                                     prefix_projection=projection, encoder_hidden_size=8)
    model = peft.get_peft_model(AutoModel.from_pretrained(str(base)), config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(5, 60, (4, 7))
    for _ in range(steps):
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        hidden.mean(1).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def peft_adapter(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_peft_prefix(tiny_bert, tmp_path_factory.mktemp("peft") / "adapter")


@pytest.mark.parametrize("projection, head", [(False, "none"), (True, "train_only")])
def test_export_gives_peft_the_same_vectors(tiny_bert: Path, tmp_path: Path, projection: bool, head: str) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt", length=4, projection=projection, head=head)
    out = export_peft(ckpt, tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "FEATURE_EXTRACTION"
    assert config["num_virtual_tokens"] == 4 and config["prefix_projection"] is False
    assert config["base_model_name_or_path"] == str(tiny_bert.resolve())
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    ours = promcse.load(str(ckpt), device="cpu").encode(TEXTS, normalize=False)
    assert np.abs(peft_vectors(out, TEXTS) - ours).max() <= 1e-5


def test_export_of_a_roberta_prompt_keeps_its_positions(tiny_roberta: Path, tmp_path: Path) -> None:
    ckpt = make_prompt_checkpoint(tiny_roberta, tmp_path / "ckpt", length=5)
    out = export_peft(ckpt, tmp_path / "adapter")
    ours = promcse.load(str(ckpt), device="cpu").encode(TEXTS, normalize=False)
    assert np.abs(peft_vectors(out, TEXTS) - ours).max() <= 1e-5


@pytest.mark.parametrize("projection", [False, True])
def test_a_peft_trained_prefix_loads_with_peft_vectors(tiny_bert: Path, tmp_path: Path, projection: bool) -> None:
    adapter = train_peft_prefix(tiny_bert, tmp_path / "adapter", projection=projection)
    encoder = promcse.load(str(adapter), device="cpu")
    assert encoder.spec.prompt.shift_positions and encoder.spec.pooler == "avg" and encoder.spec.prompt.length == 3
    assert np.abs(encoder.encode(TEXTS, normalize=False) - peft_vectors(adapter, TEXTS)).max() <= 1e-5
    again = export_peft(adapter, tmp_path / "again")  # and back: the same table
    first, second = (peft.utils.load_peft_weights(str(d))["prompt_embeddings"] for d in (adapter, again))
    assert torch.equal(first, second)


def test_a_backbone_source_can_stand_in_for_the_base_model(peft_adapter: Path, tiny_bert: Path,
                                                           tmp_path: Path) -> None:
    moved = tmp_path / "adapter"
    shutil.copytree(peft_adapter, moved)
    config = json.loads((moved / ADAPTER_CONFIG).read_text())
    (moved / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": "org/not-here"}))
    asked: list[str] = []

    def source(name: str):
        asked.append(name)
        return AutoModel.from_pretrained(str(tiny_bert), add_pooling_layer=False), AutoTokenizer.from_pretrained(
            str(tiny_bert))

    encoder = promcse.load(str(moved), device="cpu", backbones=source)
    assert asked == ["org/not-here"]
    assert np.abs(encoder.encode(TEXTS, normalize=False) - peft_vectors(peft_adapter, TEXTS)).max() <= 1e-5


@pytest.mark.parametrize("options, key", [
    ({"shift_positions": False}, "encoder.prompt.shift_positions"),
    ({"head": "always", "pooler": "cls"}, "encoder.head"),
    ({"pooler": "avg_first_last"}, "encoder.pooler"),
    ({"mode": "full", "length": 0}, "encoder.mode"),
])
def test_export_refuses_what_peft_cannot_compute(tiny_bert: Path, tmp_path: Path, options: dict, key: str) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt", **options)
    with pytest.raises(PromcseError) as caught:
        export_peft(ckpt, tmp_path / "adapter")
    assert caught.value.key == key and caught.value.path == str(ckpt / "config.json")
    assert not (tmp_path / "adapter").exists()


def test_a_gated_prompt_is_refused(tiny_bert: Path) -> None:
    shape = shape_of(AutoModel.from_pretrained(str(tiny_bert)).config)
    prompt = PromptSpec.for_backbone(shape, 4, gate=True, shift_positions=False)
    assert peft_refusal(EncoderSpec(str(tiny_bert), shape, prompt=prompt))[0] == "encoder.prompt.gate"
    assert peft_refusal(EncoderSpec(str(tiny_bert), shape, mode="frozen"))[0] == "encoder.prompt"


def test_a_lora_adapter_is_refused_by_name(tiny_bert: Path, tmp_path: Path) -> None:
    config = peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=2, target_modules=["query"])
    peft.get_peft_model(AutoModel.from_pretrained(str(tiny_bert)), config).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(PromcseError, match="LORA") as caught:
        promcse.load(str(tmp_path / "lora"), device="cpu")
    assert caught.value.key == "peft_type" and caught.value.path == str(tmp_path / "lora" / ADAPTER_CONFIG)


@pytest.mark.parametrize("edit, key", [
    ({"task_type": "SEQ_CLS"}, "task_type"),
    ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
    ({"modules_to_save": ["classifier"]}, "modules_to_save"),
    ({"revision": "v2"}, "revision"),
    ({"num_virtual_tokens": "3"}, "num_virtual_tokens"),
    ({"num_layers": True}, "num_layers"),
    ({"base_model_name_or_path": None}, "base_model_name_or_path"),
])
def test_a_bad_adapter_config_is_refused_by_field(peft_adapter: Path, tmp_path: Path, edit: dict, key: str) -> None:
    bad = tmp_path / "adapter"
    shutil.copytree(peft_adapter, bad)
    config = json.loads((bad / ADAPTER_CONFIG).read_text())
    (bad / ADAPTER_CONFIG).write_text(json.dumps({**config, **edit}))
    with pytest.raises(PromcseError) as caught:
        promcse.load(str(bad), device="cpu")
    assert caught.value.key == key and caught.value.path == str(bad / ADAPTER_CONFIG)


@pytest.mark.parametrize("shape, key", [({"layers": 3}, "num_layers"), ({"heads": 2}, "num_attention_heads"),
                                        ({"hidden": 16}, "token_dim")])
def test_an_adapter_for_another_backbone_shape_is_refused(peft_adapter: Path, tmp_path: Path, shape: dict,
                                                          key: str) -> None:
    other = write_tiny_bert(tmp_path / "other", **shape)
    bad = tmp_path / "adapter"
    shutil.copytree(peft_adapter, bad)
    config = json.loads((bad / ADAPTER_CONFIG).read_text())
    (bad / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(PromcseError) as caught:
        promcse.load(str(bad), device="cpu")
    assert caught.value.key == key and caught.value.path == str(bad / ADAPTER_CONFIG)


def test_weights_that_do_not_fit_are_refused(peft_adapter: Path, tmp_path: Path) -> None:
    bad = tmp_path / "adapter"
    shutil.copytree(peft_adapter, bad)
    config = json.loads((bad / ADAPTER_CONFIG).read_text())
    (bad / ADAPTER_CONFIG).write_text(json.dumps({**config, "num_virtual_tokens": 4}))
    with pytest.raises(PromcseError, match=r"\(4, 128\)"):
        promcse.load(str(bad), device="cpu")
    (bad / ADAPTER_WEIGHTS).rename(bad / "adapter_model.bin")
    with pytest.raises(PromcseError, match="never unpickles"):
        promcse.load(str(bad), device="cpu")


def test_without_peft_export_says_how_to_install_and_loading_still_works(
        peft_adapter: Path, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = peft_vectors(peft_adapter, TEXTS)
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(PromcseError, match=r'pip install "promcse\[peft\]"'):
        export_peft(ckpt, tmp_path / "adapter")
    got = promcse.load(str(peft_adapter), device="cpu").encode(TEXTS, normalize=False)
    assert np.abs(got - want).max() <= 1e-5


def test_cli_export_format_peft(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    out = tmp_path / "adapter"
    argv = ["export", "--format", "peft", "--model", str(ckpt), "--output", str(out)]
    assert promcse.cli.main([*argv, "--base-model", "org/base"]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "org/base"
    assert promcse.cli.main(argv) == 0  # an earlier adapter there is replaced
    assert np.abs(peft_vectors(out, TEXTS) - promcse.load(str(ckpt), device="cpu").encode(
        TEXTS, normalize=False)).max() <= 1e-5
    assert promcse.cli.main([*argv, "--copy-backbone"]) == 2
    unshifted = make_prompt_checkpoint(tiny_bert, tmp_path / "unshifted", shift_positions=False)
    capsys.readouterr()
    assert promcse.cli.main(["export", "--format", "peft", "--model", str(unshifted), "--output",
                             str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "encoder.prompt.shift_positions" in err and "Traceback" not in err


def test_serve_loads_a_peft_adapter(peft_adapter: Path) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from promcse.serving.app import create_app
    from promcse.serving.launch import BackgroundServer, load_server

    registry, indexes = load_server({"peft": str(peft_adapter)}, device="cpu")
    with BackgroundServer(create_app(registry, indexes)) as server, httpx.Client(base_url=server.url,
                                                                                 timeout=30) as client:
        body = client.post("/embed", json={"texts": TEXTS, "model": "peft"}).json()
    want = peft_vectors(peft_adapter, TEXTS)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert body["dim"] == 32 and np.abs(np.array(body["embeddings"]) - want).max() <= 1e-5
