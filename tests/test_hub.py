"""Hugging Face Hub layout and loading: ``save_pretrained``, ``promcse.load("org/name")`` through the Hub cache,
the model card's metadata (read back by huggingface_hub), ``promcse push`` against a local stand-in for the Hub,
and the CLI leaving ``HF_HUB_OFFLINE`` alone.

There is no Hub here: :class:`StandInHub` replaces ``HfApi.create_repo``/``create_branch``/``upload_folder`` with a
copy into a folder laid out as huggingface_hub's cache (``models--org--name/{blobs,snapshots/<rev>,refs/<branch>}``,
snapshot files symlinked to blobs), which ``snapshot_download(..., local_files_only=True)`` then reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

import promcse
import promcse.cli
from conftest import make_prompt_checkpoint, make_sentences
from promcse.errors import PromcseError
from promcse.models.hub import UPLOAD_IGNORE, save_pretrained
from promcse.models.model_card import build_card, eval_results, read_results
from promcse.models.roles import save_roles

ROOT = Path(__file__).resolve().parents[1]
TEXTS = make_sentences(6, seed=3)


class StandInHub:
    """A local stand-in for the Hub: uploads land in ``cache`` in huggingface_hub's cache layout."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def publish(self, folder: Path, repo_id: str, revision: str = "main",
                ignore_patterns: list[str] | None = None) -> str:
        """Copy ``folder`` in as the newest commit of ``repo_id``'s ``revision``; return the commit hash."""
        repo = self.cache / ("models--" + repo_id.replace("/", "--"))
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        files = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        commit = hashlib.sha1("\n".join(files).encode() + os.urandom(8)).hexdigest()
        for name in files:
            data = (folder / name).read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        return commit

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Put the stand-in in place of the three ``HfApi`` methods that ``push_to_hub`` calls."""
        def create_repo(api: Any, repo_id: str, **kw: Any) -> str:
            self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://hub.invalid/{repo_id}"

        def create_branch(api: Any, repo_id: str, **kw: Any) -> None:
            self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(api: Any, *, repo_id: str, folder_path: str, **kw: Any) -> Any:
            self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kw}))
            commit = self.publish(Path(folder_path), repo_id, kw.get("revision") or "main", kw.get("ignore_patterns"))
            return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{commit}", oid=commit)

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInHub:
    """An empty Hub cache in ``HF_HUB_CACHE``, offline mode set (nothing here may reach the network)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return StandInHub(cache)


def vectors(model: Any) -> np.ndarray:
    return model.encode(TEXTS, normalize=False)


def test_save_pretrained_then_load_by_hub_id(tiny_bert: Path, tmp_path: Path, hub: StandInHub) -> None:
    original = promcse.load(str(make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")), device="cpu")
    saved = save_pretrained(original, tmp_path / "saved", repo_id="org/tiny-prompt")
    assert (saved / "README.md").is_file() and (saved / "config.json").is_file()
    hub.publish(saved, "org/tiny-prompt")
    shutil.rmtree(saved)  # what loads now can only come from the cache
    loaded = promcse.load("org/tiny-prompt", device="cpu")
    assert np.abs(vectors(loaded) - vectors(original)).max() <= 1e-6 and loaded.spec == original.spec


def test_hub_ids_load_role_pairs_and_plain_backbones(tiny_bert: Path, tmp_path: Path, hub: StandInHub) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    pair = save_roles(tmp_path / "pair", query=ckpt)
    hub.publish(pair, "org/tiny-pair")  # roles.json names "query/": a folder of symlinks in the snapshot
    hub.publish(tiny_bert, "org/tiny-bert")
    roles = promcse.load("org/tiny-pair", device="cpu")
    want = promcse.load(str(pair), device="cpu")
    assert np.abs(roles.encode_query(TEXTS) - want.encode_query(TEXTS)).max() <= 1e-6
    bare = promcse.load("org/tiny-bert", device="cpu")
    assert bare.spec.backbone == "org/tiny-bert"  # recorded by its Hub name, not the snapshot folder
    assert np.abs(vectors(bare) - vectors(promcse.load(str(tiny_bert), device="cpu"))).max() <= 1e-6


def test_a_local_path_wins_over_a_hub_id(tiny_bert: Path, tmp_path: Path, hub: StandInHub,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_prompt_checkpoint(tiny_bert, tmp_path / "org" / "local")
    assert promcse.load("org/local", device="cpu").spec.prompt is not None  # nothing cached: it is the folder


def test_an_uncached_repo_offline_names_the_repo_and_the_setting(hub: StandInHub, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id: str, **kw: Any) -> str:
        calls.append(bool(kw.get("local_files_only")))
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(PromcseError, match=r"'org/not-cached'.*HF_HUB_OFFLINE is set.*unset HF_HUB_OFFLINE") as err:
        promcse.load("org/not-cached", device="cpu")
    assert str(hub.cache) in str(err.value) and calls == [True]  # the cache only: offline means no Hub call
    texts = hub.cache.parent / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert promcse.cli.main(["encode", "--model", "org/not-cached", "--input", str(texts), "--output",
                             str(hub.cache.parent / "x.npy")]) == 2


def test_an_unreachable_repo_online_is_asked_for_then_named(hub: StandInHub, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def unreachable(repo_id: str, **kw: Any) -> str:
        calls.append(bool(kw.get("local_files_only")))
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id}: no route to the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(PromcseError, match=r"'org/far-away' could not be downloaded.*HF_HUB_OFFLINE is not set"):
        promcse.load("org/far-away", device="cpu")
    assert calls == [True, False]  # the cache, then the Hub


def test_a_checkpoint_over_an_unreachable_hub_backbone_names_it(tiny_bert: Path, tmp_path: Path,
                                                               hub: StandInHub) -> None:
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["encoder"]["backbone"] = "org/absent-backbone"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(PromcseError, match=r"cannot load backbone 'org/absent-backbone'.*HF_HUB_OFFLINE is set"):
        promcse.load(str(ckpt), device="cpu")


def _minilm_checkpoint(tiny_bert: Path, out: Path) -> Path:
    """A checkpoint folder that records ``minilm`` as its backbone (cards read files; nothing is loaded)."""
    ckpt = make_prompt_checkpoint(tiny_bert, out)
    config = json.loads((ckpt / "config.json").read_text())
    config["encoder"]["backbone"] = "minilm"
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_the_model_card_metadata_reads_back_in_huggingface_hub(tiny_bert: Path, tmp_path: Path) -> None:
    ckpt = _minilm_checkpoint(tiny_bert, tmp_path / "ckpt")
    shipped = ROOT / "checkpoints" / "promcse-minilm-sup-snli" / "results.json"
    shutil.copy(shipped, ckpt / "results.json")
    card = build_card(ckpt, repo_id="org/minilm-prompt", datasets=["sentence-transformers/all-nli"])
    card.save(ckpt / "README.md")
    data = ModelCard.load(ckpt / "README.md").data
    assert (data.library_name, data.pipeline_tag, data.model_name) == ("promcse", "sentence-similarity", "minilm-prompt")
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and data.license == "apache-2.0"
    assert data.datasets == ["sentence-transformers/all-nli"] and "promcse" in data.tags
    got = {(r.task_type, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    tasks = json.loads(shipped.read_text())["tasks"]
    assert len(got) == len(tasks) + 1  # the seven STS tasks and CxC
    assert got[("sentence-similarity", "mteb/stsbenchmark-sts", "test", "spearman")] == pytest.approx(
        tasks["STSBenchmark"]["spearman"], abs=1e-4)
    assert "model-index" in data.to_dict() and 'promcse.load("org/minilm-prompt")' in card.text


def test_retrieval_results_in_both_shapes(tiny_bert: Path, tmp_path: Path) -> None:
    shipped = read_results(ROOT / "checkpoints" / "promcse-minilm-scifact-query" / "results.json")
    entries = {(r.dataset_type, r.metric_type): r.metric_value for r in eval_results(shipped)}
    assert entries[("mteb/scifact", "ndcg_at_10")] == pytest.approx(shipped["test"]["ndcg@10"], abs=1e-4)
    assert len(entries) == 4  # this model's four metrics, not the frozen baseline's
    from_eval = {"model": "x", "retrieval": {"mine:dev": {"dataset": "mine", "split": "dev",
                                                         "metrics": {"ndcg@10": 12.5, "mrr@10": 20.0}}}}
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    save_pretrained(promcse.load(str(ckpt), device="cpu"), ckpt, results=from_eval, license="mit")
    data = ModelCard.load(ckpt / "README.md").data
    assert [(r.task_type, r.dataset_name, r.dataset_split, r.metric_type, r.metric_value) for r in data.eval_results] \
        == [("retrieval", "mine", "dev", "ndcg_at_10", 12.5), ("retrieval", "mine", "dev", "mrr_at_10", 20.0)]
    assert data.license == "mit" and data.base_model is None  # a local backbone path is no Hub base model
    assert "local path" in (ckpt / "README.md").read_text()


@pytest.mark.parametrize("results, key", [
    ({"tasks": {"STS12": {"spearman": math.nan}}}, "tasks.STS12.spearman"),
    ({"tasks": {"STS12": {"spearman": "81"}}}, "tasks.STS12.spearman"),
    ({"retrieval": {"a:test": {"metrics": {"ndcg@10": None}}}}, "retrieval.a:test.metrics.ndcg@10"),
    ([{"tasks": {}}, {"tasks": {}}], "eval_results"),
])
def test_bad_results_are_refused_naming_the_key(results: Any, key: str) -> None:
    with pytest.raises(PromcseError) as err:
        eval_results(results)
    assert err.value.key == key


def test_push_through_the_stand_in_then_load(tiny_bert: Path, tmp_path: Path, hub: StandInHub,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    hub.install(monkeypatch)
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "run")
    (ckpt / "state-00000010").mkdir()
    (ckpt / "state-00000010" / "weights.safetensors").write_bytes(b"not for the Hub")
    (ckpt / ".promcse.lock").write_text("")
    want = vectors(promcse.load(str(ckpt), device="cpu"))
    assert promcse.cli.main(["push", str(ckpt), "org/pushed", "--private", "--license", "mit"]) == 0
    assert "promcse.load('org/pushed')" in capsys.readouterr().out
    (name, created), (_, upload) = hub.calls
    assert (name, created["repo_id"], created["private"], created["exist_ok"]) == ("create_repo", "org/pushed", True, True)
    assert upload["ignore_patterns"] == UPLOAD_IGNORE and ModelCard.load(ckpt / "README.md").data.license == "mit"
    repo = hub.cache / "models--org--pushed"
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "canary.json", "config.json",
                                                          "prompt.safetensors"]
    assert promcse.cli.main(["push", str(ckpt), "org/pushed", "--revision", "exp", "--commit-message", "again"]) == 0
    assert [name for name, _ in hub.calls[2:]] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[4][1]["commit_message"] == "again" and (repo / "refs" / "exp").is_file()
    shutil.rmtree(ckpt)
    assert np.abs(vectors(promcse.load("org/pushed", device="cpu")) - want).max() <= 1e-6


def test_push_refuses_a_folder_that_is_not_a_model(tiny_bert: Path, tmp_path: Path, hub: StandInHub, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    hub.install(monkeypatch)
    (tmp_path / "notes").mkdir()
    assert promcse.cli.main(["push", str(tmp_path / "notes"), "org/notes"]) == 2
    assert "not a promcse model folder" in capsys.readouterr().err
    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt")
    assert promcse.cli.main(["push", str(ckpt), "not a repo id"]) == 2
    assert "expected a Hub repository id" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text('{"tasks": {"STS12": {"spearman": "high"}}}')
    assert promcse.cli.main(["push", str(ckpt), "org/x", "--eval-json", str(tmp_path / "eval.json")]) == 2
    assert "tasks.STS12.spearman" in capsys.readouterr().err and hub.calls == [] and not (ckpt / "README.md").exists()


def test_the_cli_leaves_hub_offline_mode_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SystemExit):
        promcse.cli.main(["--version"])
    assert "HF_HUB_OFFLINE" not in os.environ
