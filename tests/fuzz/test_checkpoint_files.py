"""Fuzzing checkpoint files: every corrupt or crafted config.json / prompt.safetensors is refused cleanly.

The contract: loading either succeeds (the value was acceptable) or raises PromcseError naming the file
(and, for config.json, the key) -- never another exception, never a huge allocation, never NaN weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fuzz_examples, make_prompt_checkpoint
from promcse.encoder.backbone import load_backbone
from promcse.errors import PromcseError
from promcse.models.loading import load

HOSTILE = [None, "no", "yes", "", -1, 0, 1, 5.0, 0.5, 2**62, 1e308, True, False, [], {}, [1, 2], "x" * 300,
           {"a": 1}, 18_000_000_000_000]


@pytest.fixture(scope="module")
def good(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prompt_checkpoint(tiny_bert, tmp_path_factory.mktemp("good") / "ckpt", length=4, projection=True,
                                  pooler="cls", head="always")


@pytest.fixture(scope="module")
def shared_backbone(tiny_bert: Path):  # noqa: ANN201
    pair = load_backbone(str(tiny_bert))
    return lambda name: pair


def leaf_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in leaf_paths(v, prefix + (k,))]
    return [prefix]


def set_path(data: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def load_or_refuse(ckpt: Path, backbones, file: str) -> None:  # noqa: ANN001
    """Loads and encodes finite vectors, or raises PromcseError naming ``file`` (or the weights file, when a
    changed config makes the stored tensors the wrong shape: that is the file that no longer fits)."""
    try:
        encoder = load(ckpt, device="cpu", backbones=backbones)
    except PromcseError as err:
        assert file in str(err) or "prompt.safetensors" in str(err), str(err)
        return
    vectors = encoder.encode(["a man plays a guitar", "two dogs"], normalize=False)
    assert torch.isfinite(torch.as_tensor(vectors)).all()


def test_every_config_field_with_every_hostile_value(good: Path, shared_backbone, tmp_path: Path) -> None:
    meta = json.loads((good / "config.json").read_text())
    paths = [("encoder",) + p for p in leaf_paths(meta["encoder"])] + [("encoder",), ("format_version",)]
    assert len(paths) > 15
    for path in paths:
        for value in HOSTILE:
            ckpt = tmp_path / "c"
            shutil.copytree(good, ckpt, dirs_exist_ok=True)
            broken = json.loads(json.dumps(meta))
            set_path(broken, path, value)
            (ckpt / "config.json").write_text(json.dumps(broken), encoding="utf-8")
            load_or_refuse(ckpt, shared_backbone, "config.json")


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', "\ufeff{}", '{"format": "promcse-checkpoint"}',
                                  '{"format": "promcse-checkpoint", "encoder": 3}'])
def test_unreadable_configs(good: Path, shared_backbone, tmp_path: Path, text: str) -> None:
    ckpt = tmp_path / "c"
    shutil.copytree(good, ckpt)
    (ckpt / "config.json").write_text(text, encoding="utf-8")
    if "promcse-checkpoint" in text:
        with pytest.raises(PromcseError, match="config.json"):
            load(ckpt, device="cpu", backbones=shared_backbone)


def weights_cases(data: bytes) -> dict[str, bytes]:
    header_len = int.from_bytes(data[:8], "little")
    huge = json.dumps({"prompt.embedding.weight": {"dtype": "F32", "shape": [2**30, 2**30], "data_offsets": [0, 16]}})
    as_int = data.replace(b'"F32"', b'"I64"', 1)
    return {"empty": b"", "short": data[:5], "no-data": data[: 8 + header_len], "half": data[: len(data) // 2],
            "huge-shape": len(huge).to_bytes(8, "little") + huge.encode(), "int64": as_int,
            "header-len-lies": (2**40).to_bytes(8, "little") + data[8:], "garbage": os.urandom(256)}


@pytest.mark.parametrize("case", ["empty", "short", "no-data", "half", "huge-shape", "int64", "header-len-lies", "garbage"])
def test_crafted_weight_files(good: Path, shared_backbone, tmp_path: Path, case: str) -> None:
    ckpt = tmp_path / "c"
    shutil.copytree(good, ckpt)
    (ckpt / "prompt.safetensors").write_bytes(weights_cases((good / "prompt.safetensors").read_bytes())[case])
    with pytest.raises(PromcseError, match="prompt.safetensors"):
        load(ckpt, device="cpu", backbones=shared_backbone)


def test_nan_prompt_symlink_and_fifo(good: Path, shared_backbone, tmp_path: Path) -> None:
    import safetensors.torch

    ckpt = tmp_path / "c"
    shutil.copytree(good, ckpt)
    state = safetensors.torch.load_file(str(good / "prompt.safetensors"))
    state["prompt.embedding.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(state, str(ckpt / "prompt.safetensors"))
    with pytest.raises(PromcseError, match="NaN"):
        load(ckpt, device="cpu", backbones=shared_backbone)
    (ckpt / "prompt.safetensors").unlink()
    (ckpt / "prompt.safetensors").symlink_to("/etc/passwd")
    with pytest.raises(PromcseError, match="prompt.safetensors"):
        load(ckpt, device="cpu", backbones=shared_backbone)
    (ckpt / "prompt.safetensors").unlink()
    os.mkfifo(ckpt / "prompt.safetensors")  # reading it would block forever
    with pytest.raises(PromcseError, match="not a regular file"):
        load(ckpt, device="cpu", backbones=shared_backbone)


@settings(max_examples=fuzz_examples(), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_damage(good: Path, shared_backbone, tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray((good / "prompt.safetensors").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, min(len(raw) - 1, 400)))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    ckpt = tmp_path / "c"
    shutil.copytree(good, ckpt, dirs_exist_ok=True)
    (ckpt / "prompt.safetensors").write_bytes(bytes(raw[:cut]))
    load_or_refuse(ckpt, shared_backbone, "prompt.safetensors")


@settings(max_examples=fuzz_examples(), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
                      .filter(lambda t: t.strip()), min_size=1, max_size=6))
def test_index_texts_survive_a_save_and_load(tmp_path: Path, texts: list[str]) -> None:
    """Arbitrary Unicode (U+2028, U+2029, U+0085, NUL, ...) round-trips through an index folder."""
    import numpy as np

    from promcse.corpus.search import Index

    texts = texts + ["line\u2028sep", "para\u2029sep", "nel\x85x", "cr\rlf\r\n"]
    index = Index(None, kind="numpy", model_ref="none")
    vectors = np.eye(len(texts), 8, dtype=np.float32) + 0.01
    index.add_vectors(texts, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    index.save(tmp_path / "idx")
    assert Index.load(tmp_path / "idx", encoder=object()).texts == texts
