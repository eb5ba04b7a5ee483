"""Released PromCSE checkpoints (BertForCL layout) against a hand-written BERT forward with a prefix."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from promcse.errors import PromcseError
from promcse.models.released import SIDECAR, is_released, load_released

TEXTS = ["a man is playing guitar", "the dog runs in the park with a ball near the water", "two women eat"]
P = 3


def write_released(tiny_bert: Path, out: Path, projection: bool = False, mlp: bool = True,
                   torch_bin: bool = False) -> dict[str, torch.Tensor]:
    """Write a BertForCL-style directory from the tiny BERT; return the full state written."""
    out.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (tiny_bert / name).is_file():
            shutil.copy(tiny_bert / name, out / name)
    config = json.loads((tiny_bert / "config.json").read_text())
    config["architectures"] = ["BertForCL"]
    (out / "config.json").write_text(json.dumps(config))
    state = {f"bert.{k}": v for k, v in load_file(str(tiny_bert / "model.safetensors")).items()}
    gen = torch.Generator().manual_seed(11)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    if projection:
        state["prefix_encoder.embedding.weight"] = torch.randn(P, hidden, generator=gen)
        state["prefix_encoder.trans.0.weight"] = torch.randn(24, hidden, generator=gen) * 0.3
        state["prefix_encoder.trans.0.bias"] = torch.randn(24, generator=gen) * 0.3
        state["prefix_encoder.trans.2.weight"] = torch.randn(layers * 2 * hidden, 24, generator=gen)
        state["prefix_encoder.trans.2.bias"] = torch.randn(layers * 2 * hidden, generator=gen)
    else:
        state["prefix_encoder.embedding.weight"] = torch.randn(P, layers * 2 * hidden, generator=gen)
    if mlp:
        state["mlp.dense.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.2
        state["mlp.dense.bias"] = torch.randn(hidden, generator=gen) * 0.2
    if torch_bin:
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    return state


def layer_norm(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-12)


def linear(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def reference_forward(state: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int,
                      shift: int = P) -> torch.Tensor:
    """BERT written out by hand: the prefix is each layer's past key/value, real positions start at ``shift``."""
    s = {k.removeprefix("bert."): v for k, v in state.items()}
    table = state["prefix_encoder.embedding.weight"]
    if "prefix_encoder.trans.0.weight" in state:
        table = linear(torch.tanh(linear(table, state, "prefix_encoder.trans.0")), state, "prefix_encoder.trans.2")
    batch, tokens = ids.shape
    hidden = s["embeddings.word_embeddings.weight"].shape[1]
    layers, dim = table.shape[1] // (2 * hidden), hidden // heads
    past = table.view(P, layers * 2, heads, dim).permute(1, 2, 0, 3)  # (L*2, heads, P, dim): 2l key, 2l+1 value
    x = (s["embeddings.word_embeddings.weight"][ids] + s["embeddings.position_embeddings.weight"][shift:shift + tokens]
         + s["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, s, "embeddings.LayerNorm")
    keep = torch.cat([torch.ones(batch, P), mask.float()], dim=1)
    bias = (1.0 - keep)[:, None, None, :] * -1e9

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, tokens, heads, dim).transpose(1, 2)

    for layer in range(layers):
        pre = f"encoder.layer.{layer}"
        q = split(linear(x, s, f"{pre}.attention.self.query"))
        k = torch.cat([past[2 * layer].expand(batch, -1, -1, -1), split(linear(x, s, f"{pre}.attention.self.key"))], 2)
        v = torch.cat([past[2 * layer + 1].expand(batch, -1, -1, -1), split(linear(x, s, f"{pre}.attention.self.value"))], 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim) + bias, dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(batch, tokens, hidden)
        x = layer_norm(linear(context, s, f"{pre}.attention.output.dense") + x, s, f"{pre}.attention.output.LayerNorm")
        inner = torch.nn.functional.gelu(linear(x, s, f"{pre}.intermediate.dense"))
        x = layer_norm(linear(inner, s, f"{pre}.output.dense") + x, s, f"{pre}.output.LayerNorm")
    return x


def expected(encoder, state: dict[str, torch.Tensor], pooler: str, shift: int = P) -> np.ndarray:
    batch = encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference_forward(state, batch["input_ids"], batch["attention_mask"], heads=4, shift=shift)
        if pooler == "avg":
            m = batch["attention_mask"].unsqueeze(-1).float()
            return ((hidden * m).sum(1) / m.sum(1)).numpy()
        pooled = hidden[:, 0]
        if pooler == "cls":
            pooled = torch.tanh(linear(pooled, state, "mlp.dense"))
        return pooled.numpy()


def test_cls_with_mlp_matches_reference_forward(tiny_bert: Path, tmp_path: Path) -> None:
    state = write_released(tiny_bert, tmp_path / "rel")
    assert is_released(tmp_path / "rel") and not is_released(tiny_bert)
    encoder = load_released(tmp_path / "rel", pooler="cls", pre_seq_len=P, device="cpu")
    got = encoder.encode(TEXTS, batch_size=3, normalize=False)
    want = expected(encoder, state, "cls")
    assert np.abs(got - want).max() < 1e-5
    unshifted = expected(encoder, state, "cls", shift=0)
    assert np.abs(got - unshifted).max() > 1e-3  # the test sees the position shift


def test_sidecar_bin_projection_and_avg(tiny_bert: Path, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    state = write_released(tiny_bert, root, projection=True, mlp=False, torch_bin=True)
    (root / SIDECAR).write_text(json.dumps({"pooler": "cls_before_pooler", "pre_seq_len": P}))
    encoder = load_released(root, device="cpu")
    assert encoder.prompt.trans is not None and encoder.head is None
    assert np.abs(encoder.encode(TEXTS, batch_size=2, normalize=False) - expected(encoder, state, "cls_before_pooler")).max() < 1e-5
    averaged = load_released(root, pooler="avg", device="cpu")  # arguments override the sidecar
    assert np.abs(averaged.encode(TEXTS, normalize=False) - expected(averaged, state, "avg")).max() < 1e-5


def test_mlp_only_train_skips_the_head(tiny_bert: Path, tmp_path: Path) -> None:
    state = write_released(tiny_bert, tmp_path / "rel")
    encoder = load_released(tmp_path / "rel", pooler="cls", mlp_only_train=True, device="cpu")
    assert encoder.spec.head == "train_only"
    assert np.abs(encoder.encode(TEXTS, normalize=False) - expected(encoder, state, "cls_before_pooler")).max() < 1e-5


def test_bad_inputs(tiny_bert: Path, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    write_released(tiny_bert, root, mlp=False)
    with pytest.raises(PromcseError, match="pooler is not recorded"):
        load_released(root)
    with pytest.raises(PromcseError, match="unknown pooler"):
        load_released(root, pooler="max")
    with pytest.raises(PromcseError, match="prompt_length=5 given"):
        load_released(root, pooler="avg", pre_seq_len=5)  # the reference code's name is an alias
    with pytest.raises(PromcseError, match="prompt_length=5 given"):
        load_released(root, pooler="avg", prompt_length=5)
    with pytest.raises(PromcseError, match="disagree"):
        load_released(root, pooler="avg", prompt_length=4, pre_seq_len=5)
    with pytest.raises(PromcseError, match="needs the MLP head"):
        load_released(root, pooler="cls")
    with pytest.raises(PromcseError, match="not a released PromCSE checkpoint"):
        load_released(tiny_bert, pooler="cls")
