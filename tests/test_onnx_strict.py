"""ONNX exports are read strictly and never trusted blindly (docs/RELIABILITY.md, "ONNX exports and the export cache").

A user's export directory that is damaged or edited is refused with a PromcseError naming the file (and the key);
a cache entry that is damaged, edited, or made for another model is exported again, with a warning saying why.
One tiny export (and one cache) is built per module; each case works on a copy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import promcse  # noqa: E402
from conftest import make_prompt_checkpoint  # noqa: E402
from promcse.cli import main  # noqa: E402
from promcse.errors import PromcseError  # noqa: E402
from promcse.export.onnx import export_onnx  # noqa: E402
from promcse.models.onnx_runtime import OnnxEncoder  # noqa: E402

META = "promcse_onnx.json"
GRAPH = "model.onnx"
TEXTS = ["a man is playing guitar", "the dog runs", "a " * 80, ""]
TOL = 1e-5


@pytest.fixture(scope="module")
def built(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two checkpoints over one tiny BERT (same settings, other weights: graphs of one size), their exports, and
    a cache holding both."""
    root = tmp_path_factory.mktemp("strict")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("PROMCSE_CACHE_DIR", str(root / "cache"))
    try:
        ckpt = make_prompt_checkpoint(tiny_bert, root / "ckpt", length=3, head="always", pooler="cls")
        other = make_prompt_checkpoint(tiny_bert, root / "other", length=3, head="always", pooler="cls", seed=7)
        out = {"ckpt": ckpt, "other": other, "cache": root / "cache",
               "export": export_onnx([("p", str(ckpt))], root / "export"),
               "other_export": export_onnx([("p", str(other))], root / "other_export")}
        out["entry"] = promcse.load(str(ckpt), backend="onnx").directory
        out["other_entry"] = promcse.load(str(other), backend="onnx").directory
    finally:
        mp.undo()
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def edit_meta(change: Callable[[dict[str, Any]], Any], reseal: bool = False) -> Callable[[Path, dict], None]:
    """A case that edits ``promcse_onnx.json`` in place (``reseal``: and recomputes its digest, as a forger would)."""

    def apply(directory: Path, built: dict[str, Path]) -> None:
        meta = json.loads((directory / META).read_text())
        change(meta)
        if reseal:
            from promcse.models.onnx_meta import meta_digest

            meta["meta_sha256"] = meta_digest(meta)
        (directory / META).write_text(json.dumps(meta, indent=2))

    return apply


def write(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path, dict], None]:
    """A case that overwrites one file of the export (``data``: bytes, or a function of the old bytes)."""

    def apply(directory: Path, built: dict[str, Path]) -> None:
        path = directory / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return apply


def remove(name: str, directory_instead: bool = False) -> Callable[[Path, dict], None]:
    def apply(directory: Path, built: dict[str, Path]) -> None:
        (directory / name).unlink()
        if directory_instead:
            (directory / name).mkdir()

    return apply


def swap_graph(directory: Path, built: dict[str, Path]) -> None:
    """Another checkpoint's graph, same dimension: loads fine, gives other vectors."""
    shutil.copyfile(built["other_export"] / GRAPH, directory / GRAPH)


def graph_outside(directory: Path, built: dict[str, Path]) -> None:
    """``file`` points out of the directory, at a real graph (which old code loaded)."""
    shutil.copyfile(built["other_export"] / GRAPH, directory.parent / "x.onnx")
    edit_meta(lambda m: m.update(file="../x.onnx"))(directory, built)


def absolute_graph(directory: Path, built: dict[str, Path]) -> None:
    edit_meta(lambda m: m.update(file=str(built["other_export"] / GRAPH)))(directory, built)


def older_format(meta: dict[str, Any]) -> None:
    for key in ("files", "meta_sha256"):
        meta.pop(key)
    meta["format_version"] = 1


def drop_input(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda meta: meta["inputs"].remove(name)


def set_prompt(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda meta: meta["prompts"][0].update({key: value})


def swap_outputs(meta: dict[str, Any]) -> None:
    norm = meta["normalization"]
    norm["output"], norm["raw_output"] = norm["raw_output"], norm["output"]


# (id, change, message regex, file named, key named)
EXPORT_CASES = [
    ("graph-missing", remove(GRAPH), "missing", GRAPH, None),
    ("graph-directory", remove(GRAPH, directory_instead=True), "not a regular file", GRAPH, None),
    ("graph-truncated", write(GRAPH, lambda b: b[: len(b) // 2]), "bytes but .* were written", GRAPH, None),
    ("graph-garbage", write(GRAPH, lambda b: bytes(len(b))), "checksum", GRAPH, None),
    ("graph-swapped", swap_graph, "checksum", GRAPH, None),
    ("graph-dotdot", graph_outside, "not a file name inside", META, "file"),
    ("graph-absolute", absolute_graph, "not a file name inside", META, "file"),
    ("graph-other-name", edit_meta(lambda m: m.update(file="model_int8.onnx")), "fp32 export is model.onnx", META,
     "file"),
    ("meta-not-json", write(META, b"{not json"), "invalid JSON", META, None),
    ("meta-directory", remove(META, directory_instead=True), "not a regular file", META, None),
    ("dim-string", edit_meta(lambda m: m.update(dim="32")), "expected an integer", META, "dim"),
    ("dim-bool", edit_meta(lambda m: m.update(dim=True)), "expected an integer", META, "dim"),
    ("multi-string", edit_meta(lambda m: m.update(multi_prompt="no")), "true or false", META, "multi_prompt"),
    ("inputs-missing", edit_meta(lambda m: m.pop("inputs")), "missing", META, "inputs"),
    ("prompts-missing", edit_meta(lambda m: m.pop("prompts")), "missing", META, "prompts"),
    ("prompts-empty", edit_meta(lambda m: m.update(prompts=[])), "1..4096 prompts, got 0", META, "prompts"),
    ("prompts-null", edit_meta(lambda m: m.update(prompts=None)), "expected a list, got null", META, "prompts"),
    ("prompt-null", edit_meta(lambda m: m.update(prompts=[None])), "expected an object", META, "prompts[0]"),
    ("prompt-name-missing", edit_meta(lambda m: m["prompts"][0].pop("name")), "missing", META, "prompts[0].name"),
    ("max-length-negative", edit_meta(set_prompt("max_length", -1)), "outside 1..", META, "prompts[0].max_length"),
    ("max-length-float", edit_meta(set_prompt("max_length", 61.0)), "expected an integer", META,
     "prompts[0].max_length"),
    ("max-length-edited", edit_meta(set_prompt("max_length", 8)), "changed after the export", META, "meta_sha256"),
    ("input-dropped", edit_meta(drop_input("token_type_ids")), "the graph model.onnx takes", META, "inputs"),
    ("mask-dropped", edit_meta(drop_input("attention_mask")), "expected", META, "inputs"),
    ("prompt-id-extra", edit_meta(lambda m: m["inputs"].append("prompt_id")), "prompt_id must be the last", META,
     "inputs"),
    ("outputs-swapped", edit_meta(swap_outputs), "fixed", META, "normalization.output"),
    ("normalize-off", edit_meta(lambda m: m["normalization"].update(default=False)), "fixed", META,
     "normalization.default"),
    ("prompt-ids", edit_meta(lambda m: m.update(prompt_ids={"p": 3})), "name to its id", META, "prompt_ids"),
    ("unknown-key", edit_meta(lambda m: m.update(extra=1)), "unknown key", META, "extra"),
    ("files-outside", edit_meta(lambda m: m["files"].update({"../model.onnx": m["files"][GRAPH]})),
     "not a file name inside", META, "files"),
    ("files-graph-unlisted", edit_meta(lambda m: m["files"].pop(GRAPH)), "does not list model.onnx", META, "files"),
    ("older-format", edit_meta(older_format), "older promcse.*export the model again", META, "format_version"),
    ("tokenizer-removed", remove("tokenizer.json"), "missing", "tokenizer.json", None),
    ("tokenizer-garbage", write("tokenizer.json", b"\x00garbage"), "bytes but", "tokenizer.json", None),
    ("tokenizer-config-garbage", write("tokenizer_config.json", lambda b: b.replace(b"{", b"[", 1)), "checksum",
     "tokenizer_config.json", None),
    ("tokenizer-file-added", write("added_tokens.json", b'{"zebra": 99}'), "not written by the export",
     "added_tokens.json", None),
]


@pytest.mark.parametrize(("change", "match", "file", "key"), [c[1:] for c in EXPORT_CASES],
                         ids=[c[0] for c in EXPORT_CASES])
def test_a_damaged_export_is_refused_naming_the_file(built: dict[str, Path], tmp_path: Path, change: Callable,
                                                      match: str, file: str, key: str | None) -> None:
    directory = Path(shutil.copytree(built["export"], tmp_path / "export"))
    change(directory, built)
    with pytest.raises(PromcseError, match=match) as info:
        promcse.load(str(directory), backend="onnx")
    assert info.value.path is not None and Path(info.value.path).name == file, str(info.value)
    assert info.value.key == key, str(info.value)


def test_the_command_line_reports_a_damaged_export_in_one_line(built: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    directory = Path(shutil.copytree(built["export"], tmp_path / "export"))
    swap_graph(directory, built)
    texts = tmp_path / "texts.txt"
    texts.write_text("the dog runs\n", encoding="utf-8")
    argv = ["encode", "--backend", "onnx", "--model", str(directory), "--input", str(texts),
            "--output", str(tmp_path / "v.npy")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{directory / GRAPH}: does not match the checksum" in err and "Traceback" not in err
    assert not (tmp_path / "v.npy").exists()


def test_an_export_records_and_passes_its_seal(built: dict[str, Path]) -> None:
    from promcse.models.onnx_meta import meta_digest

    meta = json.loads((built["export"] / META).read_text())
    assert meta["format_version"] == 2 and meta["meta_sha256"] == meta_digest(meta) and "cache_key" not in meta
    written = sorted(p.name for p in built["export"].iterdir() if p.name != META)
    assert sorted(meta["files"]) == written and GRAPH in written and "tokenizer.json" in written
    assert meta["files"][GRAPH]["bytes"] == (built["export"] / GRAPH).stat().st_size
    assert OnnxEncoder(built["export"]).dim == meta["dim"]


def test_hard_coded_choices_match_the_encoder() -> None:
    """onnx_meta keeps its own copies of the mode and head choices (it must not import torch)."""
    from promcse.encoder.model import MODES
    from promcse.encoder.pooling import HEAD_MODES
    from promcse.models import onnx_meta

    assert onnx_meta.MODES == MODES and onnx_meta.HEAD_MODES == HEAD_MODES


def copy_entry(source: str) -> Callable[[Path, dict], None]:
    """Another model's complete, self-consistent cache entry copied in place of this one."""

    def apply(directory: Path, built: dict[str, Path]) -> None:
        shutil.rmtree(directory)
        shutil.copytree(built[source], directory)

    return apply


# (id, change, the reason the warning gives)
CACHE_CASES = [
    ("graph-swapped", swap_graph, "model.onnx: does not match the checksum"),
    ("graph-truncated", write(GRAPH, lambda b: b[:100]), "model.onnx: is 100 bytes"),
    ("tokenizer-garbage", write("tokenizer.json", b"{}"), "tokenizer.json: is 2 bytes"),
    ("max-length-edited", edit_meta(set_prompt("max_length", 8)), "changed after the export"),
    ("outputs-swapped", edit_meta(swap_outputs), "normalization.output"),
    ("meta-garbage", write(META, b"\xff"), "not valid UTF-8"),
    ("other-entry", copy_entry("other_entry"), "written under cache key"),
    ("max-length-forged", edit_meta(set_prompt("max_length", 8), reseal=True), "max_length is 8 but .* at most 61"),
    ("pooler-forged", edit_meta(set_prompt("pooler", "avg"), reseal=True), 'pooler is "avg" but .* "cls"'),
    ("dim-forged", edit_meta(lambda m: m.update(dim=16), reseal=True), "says 16 but the graph"),
]


@pytest.mark.parametrize(("change", "reason"), [c[1:] for c in CACHE_CASES], ids=[c[0] for c in CACHE_CASES])
def test_a_bad_cache_entry_is_exported_again_with_a_warning(built: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, change: Callable,
                                                            reason: str) -> None:
    cache = Path(shutil.copytree(built["cache"], tmp_path / "cache"))
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(cache))
    entry = cache / built["entry"].relative_to(built["cache"])
    change(entry, built)
    with pytest.warns(UserWarning, match=f"exported again: .*{reason}"):
        encoder = promcse.load(str(built["ckpt"]), backend="onnx")
    assert encoder.directory == entry
    want = promcse.load(str(built["ckpt"]), device="cpu").encode(TEXTS, normalize=False)
    assert np.abs(encoder.encode(TEXTS, normalize=False) - want).max() <= TOL
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted(p.name for p in built["cache"].joinpath(
        "onnx").iterdir())  # the bad entry moved aside and deleted, nothing left behind
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert promcse.load(str(built["ckpt"]), backend="onnx").directory == entry  # good now, used as it is


def test_a_good_cache_entry_is_used_without_export(built: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Path(shutil.copytree(built["cache"], tmp_path / "cache"))
    monkeypatch.setenv("PROMCSE_CACHE_DIR", str(cache))
    entry = cache / built["entry"].relative_to(built["cache"])
    stamp = (entry / GRAPH).stat().st_mtime_ns
    meta = json.loads((entry / META).read_text())
    assert meta["cache_key"] == entry.name
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert promcse.load(str(built["ckpt"]), backend="onnx").directory == entry
    assert (entry / GRAPH).stat().st_mtime_ns == stamp


def test_the_cache_key_holds_the_loaders_own_choices() -> None:
    """A released checkpoint loaded with another pooler must not be served from the first pooler's export."""
    from promcse.models.onnx_runtime import cache_key

    plain = cache_key("minilm")
    assert cache_key("minilm", options={"pooler": None, "prompt_length": None}) == plain
    assert len({plain, cache_key("minilm", options={"pooler": "cls"}), cache_key("minilm", options={"pooler": "avg"}),
                cache_key("minilm", options={"prompt_length": 16})}) == 4


def test_an_export_under_a_file_or_in_an_unwritable_place_is_refused_before_any_work(tmp_path: Path) -> None:
    from promcse.models.onnx_graph import check_output

    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(PromcseError, match="notes.txt is a file"):
        check_output(tmp_path / "notes.txt" / "export")
    with pytest.raises(PromcseError, match="cannot write"):
        check_output(Path("/proc/promcse-export"))
    check_output(tmp_path / "new" / "export")  # a missing parent is fine: created when written
