"""Canary vectors (canary.json): written at save, recomputed at load; a checkpoint not giving them is refused."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import make_prompt_checkpoint, write_tiny_bert
from promcse.encoder.backbone import load_backbone, shape_of
from promcse.encoder.encode import encode_texts
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.encoder.prompt import PromptSpec
from promcse.errors import PromcseError
from promcse.models import canary
from promcse.models.canary import CANARY_FILE, CANARY_TEXTS, check_canaries, read_canaries, write_canaries
from promcse.models.checkpoint import load_checkpoint, load_weights, read_spec, save_checkpoint
from promcse.models.loading import load

SHIPPED = Path(__file__).parents[1] / "checkpoints"


def encoder_over(backbone_dir: Path, mode: str = "prompt", head: str = "none", length: int = 4) -> SentenceEncoder:
    """A fresh encoder with a large random prompt (so that a changed prompt shows in the vectors)."""
    backbone, tokenizer = load_backbone(str(backbone_dir))
    shape = shape_of(backbone.config)
    prompt = PromptSpec.for_backbone(shape, length) if length else None
    torch.manual_seed(3)
    encoder = build_encoder(EncoderSpec(str(backbone_dir), shape, mode=mode, prompt=prompt, head=head), backbone,
                            tokenizer)
    if encoder.prompt is not None:
        with torch.no_grad():
            encoder.prompt.embedding.weight.normal_(0.0, 1.0)
    return encoder


def raw(encoder: SentenceEncoder, texts: list[str]) -> np.ndarray:
    return np.asarray(encode_texts(encoder, texts, normalize=False))


@pytest.fixture
def ckpt(tiny_bert: Path, tmp_path: Path) -> Path:
    return make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt", pooler="cls", head="always", projection=True)


def test_save_writes_the_models_own_vectors_of_the_fixed_texts(tiny_bert: Path, tmp_path: Path) -> None:
    encoder = encoder_over(tiny_bert).eval()
    out = save_checkpoint(encoder, tmp_path / "c")
    data = json.loads((out / CANARY_FILE).read_text(encoding="utf-8"))
    assert data["format"] == "promcse-canary" and data["format_version"] == 1 and data["tolerance"] == 1e-4
    assert data["texts"] == list(CANARY_TEXTS) and 4 <= len(CANARY_TEXTS) <= 6
    stored = np.asarray(data["vectors"], dtype=np.float32)
    assert stored.shape == (len(CANARY_TEXTS), 32)
    assert np.array_equal(stored, raw(encoder, list(CANARY_TEXTS)))  # 9 significant digits: float32 exactly
    assert not np.allclose(stored, raw(encoder_over(tiny_bert, mode="frozen", length=0), list(CANARY_TEXTS)), atol=1e-2)
    assert not list(out.glob(".*tmp"))


def test_a_good_checkpoint_loads_checked_and_without_warnings(ckpt: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = load(ckpt, device="cpu")
    assert check_canaries(encoder, ckpt) is True


def test_other_backbone_of_the_same_shape_is_refused_naming_the_difference(ckpt: Path, tmp_path: Path) -> None:
    other = load_backbone(str(write_tiny_bert(tmp_path / "other", seed=7)))
    with pytest.raises(PromcseError) as err:
        load(ckpt, device="cpu", backbones=lambda name: other)
    message = str(err.value)
    assert err.value.path == str(ckpt / CANARY_FILE) and err.value.key == "vectors"
    diff = float(message.split("differ by up to ")[1].split(" ")[0])
    assert diff > 1e-3, message
    assert "different backbone" in message and "prompt.safetensors" in message and "--" not in message


def test_a_flipped_bit_in_the_prompt_weights_is_refused(ckpt: Path) -> None:
    weights = ckpt / "prompt.safetensors"
    raw_bytes = bytearray(weights.read_bytes())
    header = json.loads(raw_bytes[8 : 8 + int.from_bytes(raw_bytes[:8], "little")])
    start = 8 + int.from_bytes(raw_bytes[:8], "little") + header["prompt.embedding.weight"]["data_offsets"][0]
    raw_bytes[start + 3] ^= 0x80  # the sign bit of the first float32 of the prefix table
    weights.write_bytes(bytes(raw_bytes))
    with pytest.raises(PromcseError, match=r"canary.json, key 'vectors': .*differ by up to .*prompt\.safetensors"):
        load(ckpt, device="cpu")


def test_edited_weights_need_rewritten_canaries(ckpt: Path) -> None:
    state = safetensors.torch.load_file(str(ckpt / "prompt.safetensors"))
    state["prompt.embedding.weight"] = state["prompt.embedding.weight"] * 1.01
    safetensors.torch.save_file(state, str(ckpt / "prompt.safetensors"))
    with pytest.raises(PromcseError, match="differ by up to"):
        load(ckpt, device="cpu")
    spec = read_spec(ckpt)
    encoder = build_encoder(spec, *load_backbone(spec.backbone))
    load_weights(encoder, ckpt)
    write_canaries(encoder.eval(), ckpt)
    assert load(ckpt, device="cpu") is not None


def test_a_checkpoint_without_canaries_loads_with_one_warning_per_folder(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / CANARY_FILE).unlink()
    copy = shutil.copytree(ckpt, tmp_path / "copy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # python's own once-per-place filter is not what keeps it to one
        first, second = load(ckpt, device="cpu"), load(str(ckpt), device="cpu")
        third = load(copy, device="cpu")
    messages = [str(w.message) for w in caught if CANARY_FILE in str(w.message)]
    assert len(messages) == 2 and str(ckpt) in messages[0] and str(copy) in messages[1], messages
    assert np.array_equal(first.encode(["a man"]), second.encode(["a man"]))
    assert np.array_equal(first.encode(["a man"]), third.encode(["a man"]))


def _set(data: dict, key: str, value: object) -> dict:
    data[key] = value
    return data


MALFORMED = {
    "bad-json": (lambda text, data: text[:-5], r"canary.json, column \d+: invalid JSON"),
    "not-an-object": (lambda text, data: "[1, 2]", r"canary.json: expected a JSON object"),
    "nan-literal": (lambda text, data: text.replace(json.dumps(data["vectors"][0][0]), "NaN", 1), r"NaN is not JSON"),
    "wrong-format": (lambda text, data: json.dumps(_set(data, "format", "x")), r"key 'format'"),
    "newer-version": (lambda text, data: json.dumps(_set(data, "format_version", 2)), r"newer promcse"),
    "vectors-type": (lambda text, data: json.dumps(_set(data, "vectors", "x")), r"key 'vectors'"),
    "vector-row-type": (lambda text, data: json.dumps(_set(data, "vectors", [7] * 5)), r"key 'vectors\[0\]'"),
    "vector-string": (lambda text, data: text.replace(json.dumps(data["vectors"][0][0]), '"NaN"', 1),
                      r"key 'vectors\[0\]': expected finite numbers, got \"NaN\""),
    "vector-bool": (lambda text, data: json.dumps(_set(data, "vectors", [[True] * 32] * 5)),
                    r"key 'vectors\[0\]': expected finite numbers, got true"),
    "vector-infinite": (lambda text, data: text.replace(json.dumps(data["vectors"][1][4]), "1e999", 1),
                        r"key 'vectors\[1\]': expected finite numbers"),
    "missing-row": (lambda text, data: json.dumps(_set(data, "vectors", data["vectors"][:-1])),
                    r"key 'vectors': expected 5 vectors"),
    "short-row": (lambda text, data: json.dumps(_set(data, "vectors", [r[:-1] for r in data["vectors"]])),
                  r"key 'vectors\[0\]': expected 32 numbers"),
    "texts-type": (lambda text, data: json.dumps(_set(data, "texts", "a man")), r"key 'texts'"),
    "text-empty": (lambda text, data: json.dumps(_set(data, "texts", ["", *data["texts"][1:]])), r"key 'texts\[0\]'"),
    "tolerance-type": (lambda text, data: json.dumps(_set(data, "tolerance", "small")), r"key 'tolerance'"),
    "tolerance-zero": (lambda text, data: json.dumps(_set(data, "tolerance", 0)), r"key 'tolerance'"),
    "unknown-key": (lambda text, data: json.dumps(_set(data, "vector", [])), r"key 'vector': unknown key"),
    "missing-texts": (lambda text, data: json.dumps({k: v for k, v in data.items() if k != "texts"}), r"key 'texts'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_canary_file_is_refused_naming_the_key(ckpt: Path, case: str) -> None:
    path = ckpt / CANARY_FILE
    edit, match = MALFORMED[case]
    text = path.read_text(encoding="utf-8")
    path.write_text(edit(text, json.loads(text)), encoding="utf-8")
    with pytest.raises(PromcseError, match=match) as err:
        load(ckpt, device="cpu")
    assert err.value.path == str(path)


def test_a_symlinked_or_fifo_canary_file_is_refused(ckpt: Path) -> None:
    path = ckpt / CANARY_FILE
    path.unlink()
    path.symlink_to("/etc/passwd")
    with pytest.raises(PromcseError, match="canary.json"):
        load(ckpt, device="cpu")
    path.unlink()
    os.mkfifo(path)  # reading it would block forever
    with pytest.raises(PromcseError, match="not a regular file"):
        load(ckpt, device="cpu")


def test_the_stored_texts_are_checked_not_the_constant(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = load(ckpt, device="cpu")
    monkeypatch.setattr(canary, "CANARY_TEXTS", ("two dogs are playing in the snow", "a girl rides a red bike"))
    write_canaries(encoder, ckpt)
    assert read_canaries(ckpt / CANARY_FILE, 32)[0] == ["two dogs are playing in the snow", "a girl rides a red bike"]
    monkeypatch.undo()
    assert check_canaries(load(ckpt, device="cpu"), ckpt)
    data = json.loads((ckpt / CANARY_FILE).read_text())
    data["texts"][0] = "a girl rides a red bike"  # another text than the vector was made of
    (ckpt / CANARY_FILE).write_text(json.dumps(data))
    with pytest.raises(PromcseError, match="differ by up to"):
        load(ckpt, device="cpu")


def test_a_save_mid_training_keeps_every_mode_flag_and_the_random_state(tiny_bert: Path, tmp_path: Path) -> None:
    encoder = encoder_over(tiny_bert, head="train_only").train()
    encoder.backbone.embeddings.eval()  # a mixed set of flags must come back as it was, not all True
    flags = [m.training for m in encoder.modules()]
    rng = torch.get_rng_state()
    save_checkpoint(encoder, tmp_path / "c")
    assert [m.training for m in encoder.modules()] == flags and encoder.training
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout drawn: resuming stays bit-identical
    stored = np.asarray(json.loads((tmp_path / "c" / CANARY_FILE).read_text())["vectors"], dtype=np.float32)
    assert np.array_equal(stored, raw(encoder, list(CANARY_TEXTS)))  # eval mode: no dropout, no train-only head
    assert load_checkpoint(tmp_path / "c") is not None


def test_full_and_frozen_checkpoints_carry_canaries(tiny_bert: Path, tmp_path: Path) -> None:
    full = encoder_over(tiny_bert, mode="full", length=0)
    with torch.no_grad():
        next(full.backbone.parameters()).add_(0.5)  # fine-tuned: its own weights differ from tiny_bert's
    out = save_checkpoint(full, tmp_path / "full")
    assert check_canaries(load_checkpoint(out), out)
    weights = out / "backbone" / "model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    state["encoder.layer.1.output.LayerNorm.weight"][0] *= -1  # one output dimension of the last layer flipped
    safetensors.torch.save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(PromcseError, match=r"backbone/ or config.json"):
        load_checkpoint(out)
    frozen = save_checkpoint(encoder_over(tiny_bert, mode="frozen", length=0), tmp_path / "frozen")
    assert sorted(p.name for p in frozen.iterdir()) == [CANARY_FILE, "config.json"]
    other = load_backbone(str(write_tiny_bert(tmp_path / "other", seed=9)))
    with pytest.raises(PromcseError, match=r"differ by up to .*edited config.json, or changed code"):
        load_checkpoint(frozen, *other)


def test_role_pairs_check_their_checkpoints(ckpt: Path, tmp_path: Path) -> None:
    from promcse.models.roles import save_roles

    pair = save_roles(tmp_path / "pair", query=ckpt)
    assert load(pair, device="cpu") is not None
    data = json.loads((pair / "query" / CANARY_FILE).read_text())
    data["vectors"][2][0] += 0.01
    (pair / "query" / CANARY_FILE).write_text(json.dumps(data))
    with pytest.raises(PromcseError, match=r"query/canary.json, key 'vectors': .*differ by up to 0.01"):
        load(pair, device="cpu")


def test_the_scale_of_the_tolerance_follows_the_vectors(tiny_bert: Path, tmp_path: Path) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "raw", pooler="cls")  # no tanh head: raw [CLS] vectors
    data = json.loads((ckpt / CANARY_FILE).read_text())
    big = max(abs(x) for row in data["vectors"] for x in row)
    assert big > 1  # large raw vectors: the tolerance scales with them
    data["vectors"][0][0] += 0.9 * 1e-4 * big
    (ckpt / CANARY_FILE).write_text(json.dumps(data))
    assert load(ckpt, device="cpu") is not None
    data["vectors"][0][0] += 0.2 * 1e-4 * big
    (ckpt / CANARY_FILE).write_text(json.dumps(data))
    with pytest.raises(PromcseError, match="differ by up to"):
        load(ckpt, device="cpu")


@pytest.mark.parametrize("folder", sorted(p.parent.relative_to(SHIPPED).as_posix()
                                          for p in SHIPPED.glob("**/config.json")))
def test_shipped_checkpoints_carry_canaries_that_pass(folder: str) -> None:
    directory = SHIPPED / folder
    texts, vectors, tolerance = read_canaries(directory / CANARY_FILE, 384)
    assert texts == list(CANARY_TEXTS) and vectors.shape == (len(CANARY_TEXTS), 384) and tolerance == 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        encoder = load_checkpoint(directory)
    assert check_canaries(encoder, directory)
