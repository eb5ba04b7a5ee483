"""The open-bank ONNX graph (prompt tables as inputs): rows of many prompts in one run equal each prompt's own torch
encode; a prompt made after the export needs no re-export; what cannot be in the graph is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import promcse
from promcse.encoder.model import SentenceEncoder
from promcse.errors import PromcseError
from promcse.models.loading import load

from conftest import make_prompt_checkpoint, make_sentences

pytest.importorskip("onnxruntime")
from promcse.models.onnx_bank import (BANK_META, OnnxBankEncoder, bank_arrays,  # noqa: E402
                                      export_bank_graph)

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def fleet(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A frozen tiny BERT, two prompts over it (P = 3 unshifted, P = 7 shifted) and the bank export of the frozen
    encoder (traced with a 3-slot example bank, so other sizes exercise the dynamic axes)."""
    root = tmp_path_factory.mktemp("onnx_bank")
    frozen = promcse.load(str(tiny_bert), device="cpu")
    share = lambda name: (frozen.backbone, frozen.tokenizer)  # noqa: E731
    short = load(str(make_prompt_checkpoint(tiny_bert, root / "short", length=3, shift_positions=False)),
                 device="cpu", backbones=share)
    long = load(str(make_prompt_checkpoint(tiny_bert, root / "long", length=7, shift_positions=True, seed=5)),
                device="cpu", backbones=share)
    return {"root": root, "frozen": frozen, "short": short, "long": long, "share": share,
            "export": export_bank_graph(frozen, root / "bank")}


def run_mixed(graph: OnnxBankEncoder, encoders: list[SentenceEncoder], texts: list[str],
              choice: list[int]) -> np.ndarray:
    return graph.run(texts, [bank_arrays(e) for e in encoders], choice)


def test_rows_of_many_prompts_equal_each_prompts_own_encode(fleet: dict) -> None:
    graph = OnnxBankEncoder(fleet["export"])
    encoders = [fleet["frozen"], fleet["short"], fleet["long"]]
    texts = make_sentences(12)
    choice = [k % 3 for k in range(len(texts))]
    got = run_mixed(graph, encoders, texts, choice)
    want = np.stack([encoders[k].encode(t) for t, k in zip(texts, choice)])
    assert np.abs(got - want).max() <= FP32_TOL
    assert np.abs(got[1] - fleet["frozen"].encode(texts[1])).max() > 1e-3  # the prompt does change the row


def test_a_prompt_made_after_the_export_needs_no_re_export(fleet: dict, tiny_bert: Path) -> None:
    graph = OnnxBankEncoder(fleet["export"])
    later = load(str(make_prompt_checkpoint(tiny_bert, fleet["root"] / "later", length=12, shift_positions=False,
                                            seed=9)), device="cpu", backbones=fleet["share"])
    texts = make_sentences(5, seed=3)
    got = run_mixed(graph, [later], texts, [0] * len(texts))
    assert np.abs(got - later.encode(texts)).max() <= FP32_TOL


def test_long_texts_are_cut_at_each_rows_own_limit(fleet: dict) -> None:
    """The shifted prompt's rows take 7 fewer tokens, as its torch encode does."""
    graph = OnnxBankEncoder(fleet["export"])
    text = " ".join(make_sentences(30))  # far over the 64 positions
    encoders = [fleet["short"], fleet["long"]]
    with pytest.warns(UserWarning):
        want = np.stack([e.encode(text) for e in encoders])
    got = run_mixed(graph, encoders, [text, text], [0, 1])
    assert np.abs(got - want).max() <= FP32_TOL


def test_the_int8_graph_stays_close(fleet: dict) -> None:
    int8 = OnnxBankEncoder(export_bank_graph(fleet["frozen"], fleet["root"] / "bank8", quantize="int8"))
    assert int8.meta["file"] == "model_int8.onnx"
    texts = make_sentences(8)
    got = run_mixed(int8, [fleet["short"]], texts, [0] * 8)
    want = fleet["short"].encode(texts)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.98


@pytest.mark.parametrize("options, key", [({"head": "always"}, "encoder.head"), ({"mode": "full"}, "encoder.mode")])
def test_what_the_graph_cannot_hold_is_refused(tiny_bert: Path, tmp_path: Path, options: dict, key: str) -> None:
    encoder = promcse.load(str(make_prompt_checkpoint(tiny_bert, tmp_path / "c", **options)), device="cpu")
    with pytest.raises(PromcseError) as err:
        bank_arrays(encoder)
    assert err.value.key == key


def test_a_changed_file_is_refused_naming_it(fleet: dict, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(fleet["export"], tmp_path / "copy"))
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    with pytest.raises(PromcseError, match="tokenizer_config.json"):
        OnnxBankEncoder(copy)
    meta = json.loads((copy / BANK_META).read_text())
    meta["format"] = "something-else"
    (copy / BANK_META).write_text(json.dumps(meta))
    with pytest.raises(PromcseError) as err:
        OnnxBankEncoder(copy)
    assert err.value.key == "format"


def test_a_reused_bank_buffer_leaves_nothing_of_the_last_batch(fleet: dict, tiny_bert: Path) -> None:
    """The padded slots of a reused bank hold the previous batch's values: they must stay masked."""
    graph = OnnxBankEncoder(fleet["export"])
    big = load(str(make_prompt_checkpoint(tiny_bert, fleet["root"] / "big", length=15, shift_positions=False,
                                          seed=11)), device="cpu", backbones=fleet["share"])
    texts = make_sentences(6, seed=5)
    run_mixed(graph, [big, fleet["long"]], texts, [0, 1] * 3)  # fills the buffer with 15-slot tables
    for encoder in (fleet["short"], fleet["frozen"]):  # then shorter banks in the same buffer
        got = run_mixed(graph, [encoder], texts, [0] * len(texts))
        assert np.abs(got - encoder.encode(texts)).max() <= FP32_TOL


@pytest.mark.parametrize("key", ["width", "position_limit", "file"])
def test_metadata_missing_a_field_is_refused_naming_it(fleet: dict, tmp_path: Path, key: str) -> None:
    import shutil

    copy = Path(shutil.copytree(fleet["export"], tmp_path / "copy"))
    meta = json.loads((copy / BANK_META).read_text())
    del meta[key]
    (copy / BANK_META).write_text(json.dumps(meta))
    with pytest.raises(PromcseError) as err:
        OnnxBankEncoder(copy)
    assert err.value.key == key
