"""ONNX export and ONNX Runtime encoding, on tiny random encoders (offline).

Bounds: the fp32 graph equals PyTorch's ``encode`` within max |delta| <= 1e-5 (raw and normalised vectors);
the int8 graph (dynamic quantisation) keeps every row's cosine to the fp32 graph >= 0.98 on these tiny random
models (seen: >= 0.9998; on all-MiniLM-L6-v2, >= 0.97 over 500 STS sentences, README "Fast inference").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import promcse  # noqa: E402
from conftest import make_prompt_checkpoint, make_sentences  # noqa: E402
from promcse.encoder.backbone import FAMILIES  # noqa: E402
from promcse.cli import main  # noqa: E402
from promcse.errors import PromcseError  # noqa: E402
from promcse.export.onnx import export_onnx  # noqa: E402
from promcse.models.onnx_graph import META_FILE, export_encoders  # noqa: E402
from promcse.models.onnx_runtime import OnnxEncoder, is_onnx_export  # noqa: E402

# different lengths, an empty text, and one cut at the position limit (64 positions less the prompt's shift)
TEXTS = make_sentences(13, seed=5) + ["", "a " * 80, "the", " ".join(make_sentences(6, seed=2))]
FP32_TOL = 1e-5
INT8_MIN_COSINE = 0.98


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))


def with_vocab(source: Path, target: Path) -> Path:
    """A copy of a tiny encoder whose tokenizer really maps words to the ids of its ``vocab.txt``.

    transformers 5 ignores ``BertTokenizerFast(vocab_file=...)``, so conftest's tiny tokenizers map every word
    to [UNK]; RoBERTa-style configs then see their pad id at every word (pad id 1 = [UNK]). Real vocabularies
    make the comparison see different tokens and correct position ids.
    """
    from transformers import BertTokenizerFast

    shutil.copytree(source, target)
    vocab = [w for w in (target / "vocab.txt").read_text(encoding="utf-8").split("\n") if w]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def backbone(tiny_family, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``backbone(model_type) -> Path``: the tiny family encoder with a working tokenizer, built once."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = with_vocab(tiny_family(model_type), tmp_path_factory.mktemp("onnx") / model_type)
        return built[model_type]

    return get


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def check_export(ref: str | Path, out: Path, texts: list[str] = TEXTS, int8: bool = True) -> OnnxEncoder:
    """Export ``ref``; its fp32 graph must equal torch, its int8 graph stay within the cosine bound."""
    torch_encoder = promcse.load(str(ref), device="cpu")
    want = torch_encoder.encode(texts, batch_size=4, normalize=False)
    onnx_encoder = OnnxEncoder(export_encoders([torch_encoder], ["p"], out / "fp32", sources=[str(ref)]))
    got = onnx_encoder.encode(texts, batch_size=4, normalize=False)
    assert got.shape == want.shape and np.abs(got - want).max() <= FP32_TOL
    unit = onnx_encoder.encode(texts, batch_size=5)
    assert np.abs(unit - torch_encoder.encode(texts, batch_size=5)).max() <= FP32_TOL
    assert onnx_encoder.max_length == torch_encoder.max_length and onnx_encoder.dim == torch_encoder.dim
    if int8:
        quantized = OnnxEncoder(export_encoders([torch_encoder], ["p"], out / "int8", quantize="int8"))
        assert quantized.precision == "int8" and not (out / "int8" / "model.onnx").exists()
        assert cosines(quantized.encode(texts, batch_size=4, normalize=False), got).min() >= INT8_MIN_COSINE
    return onnx_encoder


FAMILY_CASES = [(t, s) for t in sorted(FAMILIES) if FAMILIES[t].takes_prefix for s in (True, False)]
FAMILY_CASES += [(t, None) for t in sorted(FAMILIES) if not FAMILIES[t].takes_prefix]  # frozen, no prompt


@pytest.mark.parametrize(("model_type", "shift"), FAMILY_CASES)
def test_every_family_matches_torch(backbone, tmp_path: Path, model_type: str, shift: bool | None) -> None:
    ref: Path = backbone(model_type)
    if shift is True:  # [CLS] + head, reference position shift
        ref = make_prompt_checkpoint(ref, tmp_path / "ckpt", pooler="cls", head="always", length=5)
    elif shift is False:  # mean pooling, no head, projection MLP, unshifted positions
        ref = make_prompt_checkpoint(ref, tmp_path / "ckpt", pooler="avg", head="none", length=5, projection=True,
                                     shift_positions=False)
    check_export(ref, tmp_path)


BERT_CASES = [  # (pooler, head, length, projection, shift)
    ("avg_first_last", "none", 20, False, True), ("avg_top2", "always", 1, True, False),
    ("cls_before_pooler", "none", 4, False, False), ("cls", "train_only", 4, True, True),
    ("avg", "always", 20, True, True),
]


@pytest.mark.parametrize(("pooler", "head", "length", "projection", "shift"), BERT_CASES)
def test_poolers_heads_and_lengths_match_torch(backbone, tmp_path: Path, pooler: str, head: str, length: int,
                                               projection: bool, shift: bool) -> None:
    ckpt = make_prompt_checkpoint(backbone("bert"), tmp_path / "ckpt", pooler=pooler, head=head, length=length,
                                  projection=projection, shift_positions=shift)
    encoder = check_export(ckpt, tmp_path, int8=False)
    assert encoder.meta["prompts"][0]["max_length"] == 64 - (length if shift else 0)


PROMPTS = {  # different lengths, shifts, poolers and head modes in one graph
    "p5-shift-cls": dict(length=5, shift_positions=True, pooler="cls", head="always"),
    "p20-noshift-avg": dict(length=20, shift_positions=False, pooler="avg", head="none"),
    "p5-proj-first-last": dict(length=5, projection=True, shift_positions=False, pooler="avg_first_last"),
    "p20-proj-shift-head": dict(length=20, projection=True, shift_positions=True, pooler="avg", head="always"),
}


@pytest.fixture(scope="module")
def multi(backbone, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("multi")
    refs = {name: str(make_prompt_checkpoint(backbone("bert"), root / name, seed=i, **options))  # type: ignore[arg-type]
            for i, (name, options) in enumerate(PROMPTS.items())}
    refs["bare"] = str(backbone("bert"))
    return export_onnx(list(refs.items()), root / "graph"), refs


def test_multi_prompt_graph_gives_each_row_its_own_prompt(multi: tuple[Path, dict[str, str]]) -> None:
    out, refs = multi
    encoder = promcse.load(str(out), backend="onnx")
    assert encoder.names == list(refs) and encoder.meta["inputs"][-1] == "prompt_id"
    assert encoder.meta["prompt_ids"] == {name: k for k, name in enumerate(refs)}
    texts = (TEXTS * 3)[:40]
    chosen = [encoder.names[(i * 7) % len(refs)] for i in range(len(texts))]
    got = encoder.encode(texts, batch_size=16, normalize=False, prompt=chosen)  # every batch mixes prompts
    for name, ref in refs.items():
        rows = [i for i, n in enumerate(chosen) if n == name]
        want = promcse.load(ref, device="cpu").encode([texts[i] for i in rows], normalize=False)
        assert np.abs(got[rows] - want).max() <= FP32_TOL, name
        assert encoder.prompts[name]["max_length"] == promcse.load(ref, device="cpu").max_length


def test_one_graph_run_with_mixed_prompt_ids(multi: tuple[Path, dict[str, str]]) -> None:
    out, refs = multi
    encoder = OnnxEncoder(out)
    texts = make_sentences(len(refs) * 2, seed=9)
    ids = np.arange(len(texts), dtype=np.int64) % len(refs)
    batch = encoder.tokenizer(texts, padding=True, return_tensors="np")
    feed = {k: np.asarray(batch[k], dtype=np.int64) for k in encoder.meta["inputs"] if k != "prompt_id"}
    got = encoder.session.run(["embedding"], {**feed, "prompt_id": ids})[0]
    for row, k in enumerate(ids.tolist()):
        want = promcse.load(list(refs.values())[k], device="cpu").encode([texts[row]], normalize=False)[0]
        assert np.abs(got[row] - want).max() <= FP32_TOL


def test_load_backend_onnx_exports_once_into_the_cache(backbone, tmp_path: Path) -> None:
    ckpt = make_prompt_checkpoint(backbone("roberta"), tmp_path / "ckpt", length=3, head="always")
    encoder = promcse.load(str(ckpt), backend="onnx", device="cpu")
    assert isinstance(encoder, OnnxEncoder) and encoder.directory.parent == tmp_path / "cache" / "onnx"
    graph = encoder.directory / "model.onnx"
    stamp = graph.stat().st_mtime_ns
    again = promcse.load(str(ckpt), backend="onnx")
    assert again.directory == encoder.directory and graph.stat().st_mtime_ns == stamp
    torch_encoder = promcse.load(str(ckpt), device="cpu")
    a, b = TEXTS[:4], TEXTS[4:9]
    assert np.abs(again.similarity(a, b) - torch_encoder.similarity(a, b)).max() <= FP32_TOL
    weights = ckpt / "prompt.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert promcse.load(str(ckpt), backend="onnx").directory != encoder.directory  # a changed checkpoint
    bare = promcse.load(str(backbone("bert")), backend="onnx")  # a bare backbone: frozen, mean pooling
    assert bare.meta["prompts"][0]["mode"] == "frozen" and bare.meta["prompts"][0]["prompt_length"] == 0


def test_cli_export_eval_and_encode(backbone, tiny_data: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    first = make_prompt_checkpoint(backbone("bert"), tmp_path / "first", pooler="cls", head="always", length=4)
    second = make_prompt_checkpoint(backbone("bert"), tmp_path / "second", length=6, seed=4)
    out = tmp_path / "graph"
    assert main(["export", "--format", "onnx", "--model", str(first), "--also", f"two={second}",
                 "--output", str(out)]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["prompt_ids"] == {"first": 0, "two": 1} and meta["multi_prompt"] and (out / "tokenizer_config.json").is_file()
    results: dict[str, dict] = {}
    for backend, model in (("torch", first), ("onnx", out)):
        path = tmp_path / f"{backend}.json"
        assert main(["eval", "--backend", backend, "--model", str(model), "--tasks", "stsb", "--data-dir",
                     str(tiny_data["data_dir"]), "--json", str(path), "--no-progress", "--device", "cpu"]) == 0
        results[backend] = json.loads(path.read_text())["tasks"]["STSBenchmark"]
    assert abs(results["onnx"]["spearman"] - results["torch"]["spearman"]) <= 1e-6
    lines = tmp_path / "texts.txt"
    lines.write_text("a man is playing guitar\nthe dog runs\n", encoding="utf-8")
    assert main(["encode", "--backend", "onnx", "--model", str(out), "--input", str(lines),
                 "--output", str(tmp_path / "v.npy")]) == 0
    want = promcse.load(str(first), device="cpu").encode(["a man is playing guitar", "the dog runs"],
                                                         normalize_embeddings=True)  # the command normalises
    assert np.abs(np.load(tmp_path / "v.npy") - want).max() <= FP32_TOL
    assert main(["export", "--format", "onnx", "--model", str(first), "--output", str(tmp_path / "q"),
                 "--quantize", "int8"]) == 0
    assert sorted(p.name for p in (tmp_path / "q").glob("*.onnx")) == ["model_int8.onnx"]
    capsys.readouterr()


def test_bad_input_raises_promcse_error(backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bert = make_prompt_checkpoint(backbone("bert"), tmp_path / "bert", length=3)
    roberta = make_prompt_checkpoint(backbone("roberta"), tmp_path / "roberta", length=3)
    out = export_onnx([("bert", str(bert))], tmp_path / "graph")
    encoder = OnnxEncoder(out)
    with pytest.raises(PromcseError, match="unknown prompt 'nope'.*bert"):
        encoder.encode(["a man"], prompt="nope")
    with pytest.raises(PromcseError, match="2 texts but 1 prompt names"):
        encoder.encode(["a", "b"], prompt=["bert"])
    with pytest.raises(PromcseError, match="different backbone"):
        export_onnx([("bert", str(bert)), ("roberta", str(roberta))], tmp_path / "mixed")
    full = make_prompt_checkpoint(backbone("bert"), tmp_path / "full", mode="full", length=0)
    with pytest.raises(PromcseError, match="different backbone"):
        export_onnx([("bert", str(bert)), ("full", str(full))], tmp_path / "mixed")
    with pytest.raises(PromcseError, match="two prompts named"):
        export_onnx([("bert", str(bert)), ("bert", str(roberta))], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(PromcseError, match="must differ from the model directory"):
        export_onnx([("bert", str(bert))], tmp_path / "bert")
    with pytest.raises(PromcseError, match="not an ONNX export"):
        export_onnx([("bert", str(bert))], tmp_path / "roberta")  # would replace another checkpoint
    assert (tmp_path / "roberta" / "config.json").is_file()
    with pytest.raises(PromcseError, match="backend 'onnx'"):
        promcse.load(str(out))
    with pytest.raises(PromcseError, match="unknown backend"):
        promcse.load(str(bert), backend="tensorrt")
    with pytest.raises(PromcseError, match="runs on the CPU"):
        promcse.load(str(bert), backend="onnx", device="cuda")
    argv = ["export", "--format", "onnx", "--model", str(bert), "--also", str(roberta), "--output", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "different backbone" in capsys.readouterr().err
    assert main(["export", "--model", str(bert), "--output", str(tmp_path / "st"), "--quantize", "int8"]) == 2
    assert "--format onnx only" in capsys.readouterr().err
    assert is_onnx_export(out) and not is_onnx_export(tmp_path / "bert")
