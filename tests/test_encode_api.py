"""``encode`` shaped like sentence-transformers': argument by argument against sentence-transformers itself on the
frozen all-MiniLM-L6-v2, the same names and defaults on the ONNX encoder, and clear errors for bad arguments."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import promcse
from promcse.encoder.backbone import minilm_path, pipeline_normalizes
from promcse.encoder.model import SentenceEncoder
from promcse.encoder.outputs import quantize
from promcse.errors import PromcseError
from promcse.models.onnx_runtime import OnnxEncoder

from conftest import make_prompt_checkpoint, make_sentences

st = pytest.importorskip("sentence_transformers")

TEXTS = ["A man is playing a guitar.", "Someone plays music on a stage tonight.", "The cat sleeps.",
         "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
         "A woman is slicing an onion.", "Two dogs run across a snowy field.", "hi",
         "The committee will publish its findings in a report next spring, officials said.",
         "A child rides a red bicycle down the street.", "Rain is expected later this week."]

# (arguments, how to compare): every keyword of the sentence-transformers-shaped API, alone and combined.
CASES: list[dict[str, Any]] = [
    {}, {"normalize_embeddings": True}, {"normalize_embeddings": False}, {"truncate_dim": 64},
    {"truncate_dim": 64, "normalize_embeddings": True}, {"precision": "int8"}, {"precision": "uint8"},
    {"precision": "binary"}, {"precision": "ubinary"}, {"precision": "ubinary", "truncate_dim": 20},
    {"convert_to_tensor": True}, {"convert_to_numpy": False}, {"convert_to_tensor": True, "precision": "int8"},
    {"batch_size": 3}, {"show_progress_bar": False},
]


@pytest.fixture(scope="module")
def pair() -> tuple[Any, SentenceEncoder]:
    return st.SentenceTransformer(str(minilm_path()), device="cpu"), promcse.load("minilm", device="cpu")


def assert_same(ours: Any, theirs: Any, precision: str = "float32") -> None:
    """Same container, dtype, shape and values (quantised values: a bucket apart at most where floats round)."""
    assert type(ours) is type(theirs)
    if isinstance(theirs, list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b, precision)
        return
    a = ours.numpy() if isinstance(ours, torch.Tensor) else ours
    b = theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert a.dtype == b.dtype and a.shape == b.shape
    if precision == "float32":
        np.testing.assert_allclose(a, b, atol=2e-5)
    elif precision.endswith("binary"):
        assert (a == b).mean() > 0.99  # a bit flips only for a value within float error of 0
    else:
        assert np.abs(a.astype(np.int32) - b.astype(np.int32)).max() <= 1 and (a == b).mean() > 0.98


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "defaults")
def test_encode_equals_sentence_transformers_argument_by_argument(pair: tuple[Any, SentenceEncoder],
                                                                    kwargs: dict[str, Any]) -> None:
    model, ours = pair
    assert_same(ours.encode(TEXTS, **kwargs), model.encode(TEXTS, **kwargs), kwargs.get("precision", "float32"))


@pytest.mark.parametrize("kwargs", [{}, {"convert_to_tensor": True}, {"truncate_dim": 32},
                                    {"precision": "ubinary"}])
def test_one_string_gives_one_vector_as_in_sentence_transformers(pair: tuple[Any, SentenceEncoder],
                                                                  kwargs: dict[str, Any]) -> None:
    model, ours = pair
    assert_same(ours.encode(TEXTS[0], **kwargs), model.encode(TEXTS[0], **kwargs), kwargs.get("precision", "float32"))


def test_similarity_of_embeddings_equals_sentence_transformers(pair: tuple[Any, SentenceEncoder]) -> None:
    model, ours = pair
    a, b = ours.encode(TEXTS[:4]), ours.encode(TEXTS[4:])
    np.testing.assert_allclose(ours.similarity(a, b), model.similarity(a, b).numpy(), atol=1e-6)


def test_the_signature_follows_sentence_transformers(pair: tuple[Any, SentenceEncoder]) -> None:
    """Every argument we share has sentence-transformers' name and default (batch size apart: ours is 64)."""
    theirs = inspect.signature(st.SentenceTransformer.encode).parameters
    ours = inspect.signature(SentenceEncoder.encode).parameters
    shared = ["show_progress_bar", "precision", "convert_to_numpy", "convert_to_tensor", "normalize_embeddings",
              "truncate_dim"]
    for name in shared:
        assert ours[name].default == theirs[name].default, name
    assert list(ours)[1] == "sentences" and "inputs" in theirs  # positional in both


def test_quantize_equals_sentence_transformers_on_random_vectors() -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    x = np.random.default_rng(0).normal(size=(50, 37)).astype(np.float32)
    x[:, 3] = 0.5  # a constant column: a zero range
    for precision in ("int8", "uint8", "binary", "ubinary"):
        ours, theirs = quantize(x, precision), quantize_embeddings(x, precision=precision)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)


def test_a_model_without_normalize_returns_raw_vectors_by_default(tiny_bert: Path) -> None:
    """The changelog's break: the default is no normalisation (it used to be unit vectors)."""
    encoder = promcse.load(str(tiny_bert), device="cpu")
    assert not encoder.unit_output
    texts = make_sentences(6)
    raw = encoder.encode(texts)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    unit = encoder.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(encoder.encode(texts, normalize=True), unit, atol=1e-7)  # the older name


def test_a_pipeline_ending_in_normalize_gives_unit_vectors(tiny_bert: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_bert, tmp_path / "bert"))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (copy / "modules.json").write_text(json.dumps(modules))
    assert not pipeline_normalizes(str(copy))
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (copy / "modules.json").write_text(json.dumps(modules))
    assert pipeline_normalizes(str(copy))
    ckpt = make_prompt_checkpoint(copy, tmp_path / "ckpt", length=3, shift_positions=False)
    for ref in (str(copy), str(ckpt)):  # the frozen model and a prompt over it
        vectors = promcse.load(ref, device="cpu").encode(make_sentences(5), truncate_dim=8)
        norms = np.linalg.norm(vectors, axis=1)
        assert np.all(norms < 1.0)  # the first 8 of 32 unit-vector coordinates: normalised before truncation


@pytest.fixture(scope="module")
def onnx_pair(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SentenceEncoder, OnnxEncoder]:
    pytest.importorskip("onnxruntime")
    from promcse.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("encode_api_onnx")
    ckpt = make_prompt_checkpoint(tiny_bert, root / "ckpt", length=3, shift_positions=False)
    return promcse.load(str(ckpt), device="cpu"), OnnxEncoder(export_onnx([("p", str(ckpt))], root / "export"))


def test_the_onnx_encoder_takes_the_same_names_and_defaults() -> None:
    torch_params = inspect.signature(SentenceEncoder.encode).parameters
    onnx_params = inspect.signature(OnnxEncoder.encode).parameters
    for name, param in torch_params.items():
        if name not in ("self", "aliases"):
            assert onnx_params[name].default == param.default, name


@pytest.mark.parametrize("kwargs", [{}, {"normalize_embeddings": True}, {"truncate_dim": 8}, {"precision": "uint8"},
                                    {"precision": "binary"}, {"convert_to_tensor": True},
                                    {"convert_to_numpy": False}])
def test_onnx_encode_equals_torch_encode_under_the_same_arguments(onnx_pair: tuple[SentenceEncoder, OnnxEncoder],
                                                                  kwargs: dict[str, Any]) -> None:
    torch_encoder, onnx_encoder = onnx_pair
    texts = make_sentences(12)
    assert_same(onnx_encoder.encode(texts, **kwargs), torch_encoder.encode(texts, **kwargs),
                kwargs.get("precision", "float32"))
    if kwargs.get("precision") != "uint8":  # one vector has no uint8 range
        assert_same(onnx_encoder.encode(texts[0], **kwargs), torch_encoder.encode(texts[0], **kwargs),
                    kwargs.get("precision", "float32"))


@pytest.mark.parametrize("kwargs, key", [({"precision": "fp16"}, "precision"), ({"truncate_dim": 0}, "truncate_dim"),
                                         ({"batch_size": 0}, "batch_size"), ({"normalise": True}, "normalise"),
                                         ({"output": "list"}, "output")])
def test_bad_arguments_are_refused_by_name(tiny_bert: Path, kwargs: dict[str, Any], key: str) -> None:
    encoder = promcse.load(str(tiny_bert), device="cpu")
    with pytest.raises(PromcseError) as err:
        encoder.encode(["a text", "another"], **kwargs)
    assert err.value.key == key


def test_non_text_rows_and_one_vector_int8_are_refused(tiny_bert: Path) -> None:
    encoder = promcse.load(str(tiny_bert), device="cpu")
    with pytest.raises(PromcseError, match="text 1 is a int"):
        encoder.encode(["fine", 3])
    with pytest.raises(PromcseError, match="at least two"):
        encoder.encode("one text", precision="int8")
