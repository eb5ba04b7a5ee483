"""Gated prefix (``model.prompt_gate``, LLaMA-Adapter's zero-init attention).

At init a gated prompt encodes exactly as the frozen backbone (every family that takes a prefix, padded
batches); with non-zero gates the fast path (a custom transformers attention function) equals a hand-written
per-layer attention with two softmaxes; gradients reach gates and prefix; checkpoints carry the gates;
mixed-prompt encoding supports them; the exports that cannot carry them refuse, naming the option.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import promcse
from conftest import make_prompt_checkpoint, make_sentences
from promcse.encoder.backbone import PREFIX_FAMILIES, load_backbone, shape_of
from promcse.models.checkpoint import load_checkpoint, save_checkpoint
from promcse.training.config import ModelConfig, load_config
from promcse.errors import PromcseError
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.encoder.multiprompt import build_bank, encode_bank, encode_mixed
from promcse.encoder.prompt import GATED_ATTENTION, PromptSpec, run_encoder
from promcse.serving.registry import PromptRegistry
from promcse.training.train import encoder_spec

TEXTS = ["a man is playing the guitar in the park", "the dog runs", "two children are eating food outside",
         "a red car", "people are walking on the beach near the water and the sun is big"]


def gated_encoder(backbone_dir: Path | str, length: int = 5, gate_std: float = 0.0, std: float = 1.0,
                  pooler: str = "avg", seed: int = 0, backbone: object = None, tokenizer: object = None,
                  projection: bool = False) -> SentenceEncoder:
    """A gated-prompt encoder with a large random prefix; gates N(0, gate_std) (0: as initialised), eval mode."""
    if backbone is None:
        backbone, tokenizer = load_backbone(str(backbone_dir))
    spec = PromptSpec.for_backbone(shape_of(backbone.config), length, shift_positions=False, gate=True,
                                   projection=projection, projection_hidden=16)
    torch.manual_seed(seed)
    encoder = build_encoder(EncoderSpec(str(backbone_dir), shape_of(backbone.config), prompt=spec, pooler=pooler),
                            backbone, tokenizer)
    with torch.no_grad():
        encoder.prompt.embedding.weight.normal_(0.0, std)
        if gate_std:
            encoder.prompt.gate.normal_(0.0, gate_std)
    return encoder.eval()


@pytest.mark.parametrize("model_type", PREFIX_FAMILIES)
def test_gated_prompt_at_init_encodes_exactly_as_the_frozen_backbone(tiny_family, model_type: str) -> None:
    encoder = gated_encoder(tiny_family(model_type))
    assert torch.equal(encoder.prompt.gate, torch.zeros(2, 4))
    inputs = encoder.tokenize(TEXTS)  # padded: lengths 3..15 tokens
    assert not bool(inputs["attention_mask"].all())
    with torch.no_grad():
        ours = run_encoder(encoder.backbone, inputs, encoder.prompt, output_hidden_states=True)
        frozen = run_encoder(encoder.backbone, inputs, None, output_hidden_states=True)
        encoder.prompt.gate.fill_(0.5)
        opened = run_encoder(encoder.backbone, inputs, encoder.prompt)[0]
        encoder.prompt.gate.zero_()
    assert max(float((a - b).abs().max()) for a, b in zip(ours, frozen)) <= 1e-6  # every layer, pad positions too
    assert float((opened - frozen[-1]).abs().max()) > 1e-2, "the test must see the prefix once the gate opens"
    bare = promcse.load(str(tiny_family(model_type)), device="cpu")
    assert np.abs(encoder.encode(TEXTS, batch_size=2) - bare.encode(TEXTS, batch_size=2)).max() <= 1e-6


def model_positions(config: object, mask: torch.Tensor) -> torch.Tensor:
    """Position ids without a prefix: 0, 1, ... (BERT, ELECTRA); ``pad + n`` for the n-th real token (RoBERTa)."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        return (torch.cumsum(mask, dim=1) * mask + config.pad_token_id).long()
    return torch.arange(mask.shape[1]).expand_as(mask)


def manual_gated_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                         prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...], gate: torch.Tensor) -> torch.Tensor:
    """Plain BERT-layer re-implementation with LLaMA-Adapter's gated prefix: per layer l and head h,
    ``softmax(q K_real) V_real + gate[l, h] * softmax(q K_prefix) V_prefix`` (each softmax over its own keys)."""
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    emb = model.embeddings
    h = emb.word_embeddings(ids) + emb.position_embeddings(model_positions(cfg, mask))
    h = emb.LayerNorm(h + emb.token_type_embeddings(torch.zeros_like(ids)))
    for index, (layer, (pk, pv)) in enumerate(zip(model.encoder.layer, prefix)):
        att = layer.attention.self

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

        q, k, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
        real = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(mask[:, None, None, :] == 0, -1e9)
        ctx = real.softmax(-1) @ v + gate[index][None, :, None, None] * ((q @ pk.transpose(-1, -2) / math.sqrt(d))
                                                                         .softmax(-1) @ pv)
        ctx = ctx.transpose(1, 2).reshape(h.shape)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    return h


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra"])
def test_fast_path_equals_manual_gated_attention(tiny_family, model_type: str) -> None:
    encoder = gated_encoder(tiny_family(model_type), gate_std=1.0)
    inputs = encoder.tokenize(TEXTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        ours = run_encoder(encoder.backbone, inputs, encoder.prompt)[0]
        expected = manual_gated_forward(encoder.backbone, ids, mask, encoder.prompt(len(TEXTS)),
                                        encoder.prompt.gate_values())
        ungated = manual_gated_forward(encoder.backbone, ids, mask, encoder.prompt(len(TEXTS)), torch.zeros(2, 4))
    real = mask.bool()
    assert float((ours[real] - expected[real]).abs().max()) <= 1e-5
    assert float((ours[real] - ungated[real]).abs().max()) > 1e-2, "the test must see the gated prefix"


@pytest.mark.parametrize("projection", [False, True])
def test_gradients_reach_the_gates_and_then_the_prefix(tiny_bert: Path, projection: bool) -> None:
    encoder = gated_encoder(tiny_bert, std=0.02, projection=projection).train()
    inputs = encoder.tokenize(TEXTS)
    prompt = encoder.prompt
    assert set(encoder.trainable_tensors()) >= {"prompt.gate", "prompt.embedding.weight"}
    encoder(inputs).square().sum().backward()
    assert bool(prompt.gate.grad.abs().gt(0).all())  # every layer's every head
    assert float(prompt.embedding.weight.grad.abs().max()) == 0.0  # tanh(0) = 0 shields the prefix at init
    torch.optim.AdamW(encoder.trainable_parameters(), lr=1e-2).step()
    encoder.zero_grad()
    encoder(inputs).square().sum().backward()
    assert float(prompt.embedding.weight.grad.abs().max()) > 0.0  # the gate opened: the prefix learns too
    if projection:
        assert all(float(p.grad.abs().max()) > 0 for p in prompt.trans.parameters())
    assert not any(p.grad is not None for p in encoder.backbone.parameters())  # the backbone stays frozen


def test_the_switch_leaves_ungated_users_of_the_backbone_unchanged(tiny_bert: Path, tmp_path: Path) -> None:
    backbone, tokenizer = load_backbone(str(tiny_bert))
    plain_ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "plain", length=4)
    plain = load_checkpoint(plain_ckpt, backbone=backbone, tokenizer=tokenizer)
    bare = build_encoder(EncoderSpec(str(tiny_bert), shape_of(backbone.config), mode="frozen"), backbone, tokenizer)
    before = plain.encode(TEXTS), bare.encode(TEXTS)
    assert backbone.config._attn_implementation == "sdpa"
    gated = gated_encoder(tiny_bert, gate_std=1.0, backbone=backbone, tokenizer=tokenizer)
    assert backbone.config._attn_implementation == GATED_ATTENTION
    assert np.array_equal(plain.encode(TEXTS), before[0]) and np.array_equal(bare.encode(TEXTS), before[1])
    assert np.abs(gated.encode(TEXTS) - before[1]).max() > 1e-3


def test_a_backbone_without_sdpa_attention_is_refused(tiny_bert: Path) -> None:
    from transformers import AutoModel

    backbone, tokenizer = load_backbone(str(tiny_bert))
    eager = AutoModel.from_pretrained(str(tiny_bert), attn_implementation="eager")
    with pytest.raises(PromcseError, match="SDPA") as err:
        gated_encoder(tiny_bert, backbone=eager, tokenizer=tokenizer)
    assert err.value.key == "model.prompt_gate"


def test_run_config_option_reaches_the_encoder_spec(tiny_bert: Path) -> None:
    backbone, tokenizer = load_backbone(str(tiny_bert))
    config = load_config(None, ["model.prompt_gate=true", "model.shift_positions=false", f"model.backbone={tiny_bert}"])
    spec = encoder_spec(config.model, backbone)
    assert spec.prompt is not None and spec.prompt.gate and not spec.prompt.shift_positions
    assert build_encoder(spec, backbone, tokenizer).prompt.gate.shape == (2, 4)
    assert not encoder_spec(ModelConfig(), backbone).prompt.gate  # off by default
    shifted = encoder_spec(ModelConfig(prompt_gate=True), backbone)  # shift_positions defaults to true
    with pytest.raises(PromcseError, match="shift_positions=false") as err:
        build_encoder(shifted, backbone, tokenizer)
    assert err.value.key == "model.shift_positions"


def test_checkpoint_round_trip_keeps_the_gates(tiny_roberta: Path, tmp_path: Path) -> None:
    encoder = gated_encoder(tiny_roberta, gate_std=1.0)
    ckpt = save_checkpoint(encoder, tmp_path / "gated")
    stored = safetensors.torch.load_file(str(ckpt / "prompt.safetensors"))
    assert torch.equal(stored["prompt.gate"], encoder.prompt.gate.detach())
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["encoder"]["prompt"]["gate"] is True
    loaded = promcse.load(str(ckpt), device="cpu")
    assert loaded.gated and torch.equal(loaded.prompt.gate, encoder.prompt.gate)
    assert np.abs(loaded.encode(TEXTS) - encoder.encode(TEXTS)).max() <= 1e-6


def test_ungated_checkpoints_are_unchanged(tiny_bert: Path, tmp_path: Path) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "plain", length=4)
    meta = json.loads((ckpt / "config.json").read_text())
    assert "gate" not in meta["encoder"]["prompt"]  # older readers keep reading new ungated checkpoints
    assert set(safetensors.torch.load_file(str(ckpt / "prompt.safetensors"))) == {"prompt.embedding.weight"}
    loaded = promcse.load(str(ckpt), device="cpu")
    assert not loaded.gated and loaded.prompt.gate is None


def _edit(ckpt: Path, prompt_fields: dict[str, object] | None = None, tensors: dict[str, torch.Tensor] | None = None,
          drop: str | None = None) -> None:
    meta = json.loads((ckpt / "config.json").read_text())
    meta["encoder"]["prompt"].update(prompt_fields or {})
    (ckpt / "config.json").write_text(json.dumps(meta))
    state = safetensors.torch.load_file(str(ckpt / "prompt.safetensors"))
    state.update(tensors or {})
    state.pop(drop, None)
    safetensors.torch.save_file(state, str(ckpt / "prompt.safetensors"))


@pytest.mark.parametrize("case, match", [
    ("shifted", "shift_positions must be false"),
    ("not_bool", "expected bool"),
    ("missing_gate", r"missing \['prompt.gate'\]"),
    ("gate_shape", r"'prompt.gate' has shape \(4, 2\)"),
    ("unexpected_gate", r"unexpected \['prompt.gate'\]"),
])
def test_checkpoint_gates_are_validated(tiny_bert: Path, tmp_path: Path, case: str, match: str) -> None:
    ckpt = save_checkpoint(gated_encoder(tiny_bert, gate_std=1.0), tmp_path / "gated")
    edits = {
        "shifted": dict(prompt_fields={"shift_positions": True}),
        "not_bool": dict(prompt_fields={"gate": "yes"}),
        "missing_gate": dict(drop="prompt.gate"),
        "gate_shape": dict(tensors={"prompt.gate": torch.zeros(4, 2)}),
        "unexpected_gate": dict(prompt_fields={"gate": False}),
    }[case]
    _edit(ckpt, **edits)  # type: ignore[arg-type]
    with pytest.raises(PromcseError, match=match) as err:
        promcse.load(str(ckpt), device="cpu")
    assert err.value.path is not None and err.value.path.startswith(str(ckpt))
    if case in ("shifted", "not_bool"):
        assert err.value.key == "encoder.prompt.gate"


def test_mixed_prompt_encoding_carries_the_gates(tiny_bert: Path, tmp_path: Path) -> None:
    reg = PromptRegistry(device="cpu")
    for name, seed, length in (("gated-a", 1, 5), ("gated-b", 2, 3)):  # P 5 and 3: padded slots in the bank
        reg.add(name, save_checkpoint(gated_encoder(tiny_bert, length, gate_std=1.0, seed=seed), tmp_path / name))
    reg.add("plain", make_prompt_checkpoint(tiny_bert, tmp_path / "plain", length=4, shift_positions=False))
    reg.add("bare", str(tiny_bert))
    assert len(reg.backbones) == 1
    assert [reg.describe(n)["prompt_gate"] for n in ("gated-a", "plain", "bare")] == [True, False, False]
    names, texts = reg.names, make_sentences(24, seed=3)
    chosen = [names[i % len(names)] for i in range(len(texts))]
    encoders = [reg.get(n) for n in chosen]
    mixed = encode_mixed(encoders, texts, batch_size=5, normalize=False)
    served = np.stack(reg.encode_rows(texts, chosen, batch_size=5))
    for name in names:
        rows = [i for i, n in enumerate(chosen) if n == name]
        want = reg.get(name).encode([texts[i] for i in rows], batch_size=5, normalize=False)
        assert np.abs(mixed[rows] - want).max() <= 1e-5, name
        assert np.abs(served[rows] - want).max() <= 1e-5, name
    members = [reg.get("gated-a"), reg.get("gated-b"), reg.get("bare")]  # bare rows in a gated bank: gate 0
    gated_bank = build_bank(members)
    assert gated_bank.gates is not None and gated_bank.gates.shape == (3, 2, 4) and not bool(gated_bank.gates[2].any())
    ids = [i % 3 for i in range(len(texts))]
    rows_out = encode_bank(gated_bank, texts, ids, batch_size=5).numpy()
    for k, encoder in enumerate(members):
        rows = [i for i in range(len(texts)) if ids[i] == k]
        assert np.abs(rows_out[rows] - encoder.encode([texts[i] for i in rows], normalize=False)).max() <= 1e-5
    with pytest.raises(PromcseError, match="model.prompt_gate") as err:
        build_bank([reg.get("gated-a"), reg.get("plain")])
    assert err.value.key == "model.prompt_gate"


def test_onnx_export_refuses_a_gated_prompt(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    from promcse.models.onnx_graph import export_encoders

    ckpt = save_checkpoint(gated_encoder(tiny_bert), tmp_path / "gated")
    with pytest.raises(PromcseError, match="model.prompt_gate") as err:
        export_encoders([promcse.load(str(ckpt), device="cpu")], ["gated"], tmp_path / "onnx")
    assert err.value.key == "model.prompt_gate" and not (tmp_path / "onnx").exists()
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(PromcseError, match="model.prompt_gate"):
        promcse.load(str(ckpt), backend="onnx")


def test_sentence_transformers_export_refuses_a_gated_prompt(tiny_bert: Path, tmp_path: Path) -> None:
    from promcse.export.sentence_transformers import export_sentence_transformers

    ckpt = save_checkpoint(gated_encoder(tiny_bert), tmp_path / "gated")
    with pytest.raises(PromcseError, match="model.prompt_gate") as err:
        export_sentence_transformers(ckpt, tmp_path / "st")
    assert err.value.key == "model.prompt_gate" and not (tmp_path / "st").exists()


def test_gate_lr_gives_the_gates_their_own_learning_rate(tiny_bert: Path) -> None:
    from promcse.training.config import TrainConfig
    from promcse.training.train import make_optimizer

    encoder = gated_encoder(tiny_bert, gate_std=0.5, std=0.02).train()  # open gates: the prefix gets gradients too
    optimizer, scheduler = make_optimizer(encoder, TrainConfig(lr=1e-3, gate_lr=0.5), total_steps=10)
    gate_group = [g for g in optimizer.param_groups if any(p is encoder.prompt.gate for p in g["params"])]
    assert len(optimizer.param_groups) == 2 and len(gate_group) == 1 and gate_group[0]["params"] == [encoder.prompt.gate]
    before = {name: p.detach().clone() for name, p in encoder.trainable_tensors().items()}
    encoder(encoder.tokenize(TEXTS)).square().sum().backward()  # any loss that reaches gates and prefix
    optimizer.step()
    scheduler.step()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in encoder.trainable_tensors().items()}
    # AdamW's first step moves every parameter with a non-zero gradient by about its group's lr
    assert moved["prompt.gate"] == pytest.approx(0.5, rel=1e-3)
    assert moved["prompt.embedding.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert scheduler.get_last_lr() == pytest.approx([1e-3 * 0.9, 0.5 * 0.9])  # one schedule scales both


def test_gate_lr_default_and_misuse(tiny_bert: Path) -> None:
    from promcse.training.config import TrainConfig
    from promcse.training.train import make_optimizer

    optimizer, _ = make_optimizer(gated_encoder(tiny_bert), TrainConfig(lr=1e-3), total_steps=10)
    assert len(optimizer.param_groups) == 1  # 0: the gates train at train.lr with the rest
    with pytest.raises(PromcseError, match="model.prompt_gate") as err:
        load_config(None, ["train.gate_lr=0.1", f"model.backbone={tiny_bert}"])
    assert err.value.key == "train.gate_lr"
    with pytest.raises(PromcseError) as err:
        load_config(None, ["train.gate_lr=-1", "model.prompt_gate=true", "model.shift_positions=false"])
    assert err.value.key == "train.gate_lr"
