"""Distillation: both losses against loop references, the teacher cache, and a run on a tiny random teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_bert
from promcse.training.config import load_config
from promcse.errors import PromcseError
from promcse.objectives.losses import distill_contrastive, distill_similarity, same_text_columns
from promcse.training.teacher import build_source_caches, build_teacher_cache
from promcse.training.train import train
from test_losses import _cos
from test_train import changed_tensors, fresh_encoder, snapshot, tiny_config


def _ref_contrastive(s, t, tau):
    total = 0.0
    for i in range(len(s)):
        denom = sum(torch.exp(_cos(s[i], t[j]) / tau) for j in range(len(t)))
        total = total - torch.log(torch.exp(_cos(s[i], t[i]) / tau) / denom)
    return total / len(s)


def _ref_similarity(sr, sc, tr, tc, tau, skip=()):
    """Loop reference; ``skip``: the (i, j) pairs left out of row i's distributions."""
    total, rows = 0.0, 0
    for i in range(len(sr)):
        cols = [j for j in range(len(sc)) if (i, j) not in skip]
        if not cols:
            continue
        rows += 1
        zs = sum(torch.exp(_cos(sr[i], sc[j]) / tau) for j in cols)
        zt = sum(torch.exp(_cos(tr[i], tc[j]) / tau) for j in cols)
        for j in cols:
            ps, pt = torch.exp(_cos(sr[i], sc[j]) / tau) / zs, torch.exp(_cos(tr[i], tc[j]) / tau) / zt
            total = total + pt * (torch.log(pt) - torch.log(ps))
    return total / rows


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def test_contrastive_distillation_matches_loop_reference():
    s, t = _rand(5, 4, seed=1), _rand(5, 4, seed=2)
    fast, ref = distill_contrastive(s, t, 0.3), _ref_contrastive(s, t, 0.3)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    (g_fast,) = torch.autograd.grad(fast, [s])
    g_ref_s, g_ref_t = torch.autograd.grad(ref, [s, t])
    torch.testing.assert_close(g_fast, g_ref_s, rtol=1e-9, atol=1e-11)
    assert torch.count_nonzero(g_ref_t) > 0  # the reference would move the teacher ...
    assert torch.autograd.grad(distill_contrastive(s, t, 0.3), [t], allow_unused=True)[0] is None  # ... ours never


def test_similarity_distillation_matches_loop_reference_across_dimensions():
    sr, sc = _rand(3, 4, seed=3), _rand(7, 4, seed=4)
    tr, tc = _rand(3, 6, seed=5), _rand(7, 6, seed=6)  # teacher dimension 6, student 4
    fast, ref = distill_similarity(sr, sc, tr, tc, 0.2), _ref_similarity(sr, sc, tr, tc, 0.2)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fast, [sr, sc]), torch.autograd.grad(ref, [sr, sc])):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    same = distill_similarity(sr, sc, sr.detach(), sc.detach(), 0.2)
    assert abs(same.item()) < 1e-12  # a student that equals its teacher has nothing to learn


def test_similarity_distillation_leaves_out_the_excluded_columns_as_the_loop_reference():
    sr, sc = _rand(4, 4, seed=7), _rand(9, 4, seed=8)
    tr, tc = _rand(4, 6, seed=9), _rand(9, 6, seed=10)
    skip = {(0, 0), (1, 1), (1, 5), (2, 2)} | {(3, j) for j in range(9)}  # row 3: every column left out
    exclude = torch.zeros(4, 9, dtype=torch.bool)
    for i, j in skip:
        exclude[i, j] = True
    fast, ref = distill_similarity(sr, sc, tr, tc, 0.1, exclude=exclude), _ref_similarity(sr, sc, tr, tc, 0.1, skip)
    assert torch.isfinite(fast)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fast, [sr, sc]), torch.autograd.grad(ref, [sr, sc])):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    everything = torch.ones(4, 9, dtype=torch.bool)
    assert distill_similarity(sr, sc, tr, tc, 0.1, exclude=everything).item() == 0.0
    with pytest.raises(ValueError, match="exclude"):
        distill_similarity(sr, sc, tr, tc, 0.1, exclude=exclude[:, :5])


def test_the_objective_leaves_out_each_anchors_own_text():
    """Views (anchor, positive, hard negative) and a dropout-view batch (the anchor's text twice): the columns
    of the anchor's own text carry no relation and would swamp both distributions at low tau."""
    from promcse.objectives.objective import Objective

    objective = Objective(name="nt_xent", temperature=0.05, distill="similarity", distill_temperature=0.05)
    student = [_rand(5, 4, seed=s) for s in (11, 12, 13)]
    teacher = [_rand(5, 6, seed=s).detach() for s in (14, 15, 16)]
    teacher[2][3] = teacher[0][1]  # row 1's text is also row 3's hard negative
    cols_s, cols_t = torch.cat(student), torch.cat(teacher)
    skip = {(i, i) for i in range(5)} | {(1, 13)}
    got = objective.distill_terms(student, teacher)
    torch.testing.assert_close(got, _ref_similarity(student[0], cols_s, teacher[0], cols_t, 0.05, skip),
                               rtol=1e-10, atol=1e-12)
    assert same_text_columns(teacher[0], cols_t).nonzero().tolist() == sorted([list(p) for p in skip])
    dropout = [student[0], student[1]], [teacher[0], teacher[0]]  # unsupervised: the same texts twice
    skip2 = {(i, i) for i in range(5)} | {(i, 5 + i) for i in range(5)}
    torch.testing.assert_close(objective.distill_terms(*dropout),
                               _ref_similarity(student[0], torch.cat(dropout[0]), teacher[0], torch.cat(dropout[1]),
                                               0.05, skip2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("call", [
    lambda: distill_contrastive(torch.randn(4, 3), torch.randn(4, 5)),
    lambda: distill_contrastive(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0),
    lambda: distill_similarity(torch.randn(4, 3), torch.randn(6, 3), torch.randn(4, 5), torch.randn(5, 5)),
])
def test_bad_distillation_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different tiny random BERT (hidden 48, not the student's 32) as teacher."""
    return write_tiny_bert(tmp_path_factory.mktemp("teacher"), hidden=48, heads=4, seed=5)


def test_distillation_trains_only_the_prompt_and_caches_the_teacher(tiny_bert, tiny_teacher, tiny_data, tmp_path,
                                                                     monkeypatch):
    cache = tmp_path / "cache"
    config = tiny_config(tiny_bert, tiny_data, f"loss.distill_teacher={tiny_teacher}", f"loss.distill_cache={cache}",
                         "loss.distill_weight=2.0")
    encoder = fresh_encoder(tiny_bert, config)
    backbone_before, prompt_before = snapshot(encoder.backbone), snapshot(encoder.prompt)
    train(config, tmp_path / "run", show_progress=False, encoder=encoder)
    assert changed_tensors(encoder.backbone, backbone_before) == []
    assert changed_tensors(encoder.prompt, prompt_before) == ["embedding.weight"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "distill" in line]
    assert steps and all(abs(l["loss"] - l["nt_xent"] - 2.0 * l["distill"]) < 1e-4 for l in steps)
    records = sorted(cache.glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["dim"] == 48
    # a second run (another seed) reuses the cache: the teacher is never loaded again
    monkeypatch.setattr("promcse.training.teacher.load", lambda *a, **k: pytest.fail("teacher reloaded"))
    again = tiny_config(tiny_bert, tiny_data, f"loss.distill_teacher={tiny_teacher}", f"loss.distill_cache={cache}",
                        "train.seed=7", "loss.name=distill")
    result = train(again, tmp_path / "run2", show_progress=False)
    assert result.steps == 4
    lines = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert all("nt_xent" not in l for l in lines) and any("distill" in l for l in lines)


def test_teacher_cache_holds_the_teachers_vectors_and_refuses_a_changed_file(tiny_teacher, tmp_path):
    from promcse import load

    texts = ["a man is playing", "a dog runs", "a man is playing"]
    cache = build_teacher_cache(str(tiny_teacher), texts, tmp_path, device="cpu", show_progress=False)
    assert len(cache.rows) == 2 and cache.dim == 48
    direct = torch.from_numpy(load(str(tiny_teacher), device="cpu").encode(["a dog runs"], normalize=True))
    torch.testing.assert_close(cache.views([["a dog runs"]])[0], direct, rtol=1e-5, atol=1e-6)
    npy = next(tmp_path.glob("*.npy"))
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    with pytest.raises(PromcseError, match="does not match its record"):
        build_teacher_cache(str(tiny_teacher), texts, tmp_path, device="cpu", show_progress=False)


def test_multi_source_run_reuses_a_single_source_cache_and_embeds_only_the_new_source(tiny_bert, tiny_teacher,
                                                                                      tiny_data, tmp_path,
                                                                                      monkeypatch):
    import promcse.training.teacher as teacher_module

    cache = tmp_path / "cache"
    common = (f"loss.distill_teacher={tiny_teacher}", f"loss.distill_cache={cache}", "loss.distill_weight=2.0")
    train(tiny_config(tiny_bert, tiny_data, *common), tmp_path / "one", show_progress=False)
    assert len(list(cache.glob("*.json"))) == 1
    embedded: list[int] = []
    real_load = teacher_module.load

    def counting_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        real_encode = model.encode
        model.encode = lambda texts, **kw: (embedded.append(len(texts)), real_encode(texts, **kw))[1]
        return model

    monkeypatch.setattr(teacher_module, "load", counting_load)
    wiki = tmp_path / "other.txt"  # texts the first run never saw
    wiki.write_text("".join(f"{line} again\n" for line in tiny_data["txt"].read_text().splitlines()), encoding="utf-8")
    sources = f"data.sources=[{{file: {wiki}}}, {{file: {tiny_data['csv']}}}]"
    result = train(tiny_config(tiny_bert, tiny_data, *common, sources), tmp_path / "two", show_progress=False)
    assert result.steps == 4
    assert embedded == [60]  # the new sentence file only: the triplets' cache of the first run is reused
    assert len(list(cache.glob("*.json"))) == 2


def test_merged_source_caches_give_each_text_its_teachers_vector(tiny_teacher, tmp_path):
    from promcse import load

    first, second = ["a man is playing", "a dog runs"], ["a dog runs", "the sky is blue", "a cat sleeps"]
    merged = build_source_caches(str(tiny_teacher), [first, second], tmp_path, device="cpu", show_progress=False)
    texts = list(dict.fromkeys(first + second))
    assert sorted(merged.rows) == sorted(texts)
    direct = torch.from_numpy(load(str(tiny_teacher), device="cpu").encode(texts, normalize=True))
    torch.testing.assert_close(merged.views([texts])[0], direct, rtol=1e-5, atol=1e-6)


def test_contrastive_distillation_across_dimensions_is_refused(tiny_bert, tiny_teacher, tiny_data, tmp_path):
    config = tiny_config(tiny_bert, tiny_data, f"loss.distill_teacher={tiny_teacher}", "loss.distill=contrastive")
    with pytest.raises(PromcseError, match="dimension") as err:
        train(config, tmp_path / "run", show_progress=False)
    assert err.value.key == "loss.distill"


@pytest.mark.parametrize("override,key", [
    (["loss.name=distill"], "loss.distill_teacher"),
    (["loss.distill=kl"], "loss.distill"),
    (["loss.distill_temperature=0"], "loss.distill_temperature"),
])
def test_distillation_config_is_checked_before_anything_loads(override, key):
    with pytest.raises(PromcseError) as err:
        load_config(None, override)
    assert err.value.key == key
