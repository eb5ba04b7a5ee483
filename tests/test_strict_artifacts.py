"""Artifacts promcse reads or writes around a run, refused with a PromcseError naming the file and key.

Pickled-only backbone folders (never unpickled), the distillation cache directory and its records, the miner's
and the sentence-transformers exporter's output paths, the model card's inputs, and damaged parquet pages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_prompt_checkpoint, make_sentences
from promcse.errors import PromcseError

UNWRITABLE = Path("/proc/promcse-strict-artifacts")  # /proc takes no new files, even for root


def forbid(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> None:
    """Make ``target.name`` fail the test if it is called (the work the check must come before)."""

    def called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{name} was called before the bad input was refused")

    monkeypatch.setattr(target, name, called)


# --- 1. backbone folders holding only pickled weights ---------------------------------------------------------


def pickled_copy(tiny_bert: Path, out: Path, name: str = "pytorch_model.bin") -> Path:
    """The tiny BERT's config and tokenizer, its weights as a pickle (``torch.save``) and no safetensors."""
    shutil.copytree(tiny_bert, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_file(str(tiny_bert / "model.safetensors")), out / name)
    return out


def test_a_backbone_folder_with_only_pytorch_model_bin_is_refused_unread(
        tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from promcse.encoder.backbone import load_backbone

    folder = pickled_copy(tiny_bert, tmp_path / "pickled")
    forbid(monkeypatch, torch, "load")
    with pytest.raises(PromcseError) as err:
        load_backbone(str(folder))
    assert err.value.path == str(folder) and err.value.key == "model.backbone"
    assert "pytorch_model.bin" in err.value.message and "never unpickles" in err.value.message
    assert "safetensors" in err.value.message


def test_a_sharded_pickle_and_a_config_naming_a_pickle_are_refused(tiny_bert: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from promcse.encoder.backbone import load_backbone

    sharded = pickled_copy(tiny_bert, tmp_path / "sharded")
    (sharded / "pytorch_model.bin").rename(sharded / "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": {k: "pytorch_model-00001-of-00001.bin"
                                            for k in load_file(str(tiny_bert / "model.safetensors"))}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    named = tmp_path / "named"
    shutil.copytree(tiny_bert, named)
    torch.save(load_file(str(tiny_bert / "model.safetensors")), named / "adapter_model.bin")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    forbid(monkeypatch, torch, "load")
    with pytest.raises(PromcseError, match="pytorch_model.bin.index.json.*never unpickles") as err:
        load_backbone(str(sharded))
    assert err.value.path == str(sharded)
    with pytest.raises(PromcseError, match="adapter_model.bin.*never unpickles") as err:
        load_backbone(str(named))
    assert err.value.path == str(named / "config.json") and err.value.key == "transformers_weights"


def test_the_cli_refuses_a_pickled_backbone_in_one_line(tiny_bert: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from promcse.cli import main

    folder = pickled_copy(tiny_bert, tmp_path / "pickled")
    (tmp_path / "c.txt").write_text("a dog runs\n", encoding="utf-8")
    code = main(["encode", "--model", str(folder), "--input", str(tmp_path / "c.txt"), "--output",
                 str(tmp_path / "v.npy"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "never unpickles" in err and str(folder) in err
    assert "Traceback" not in err and not (tmp_path / "v.npy").exists()


# --- 2. the distillation cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["file", "under_file", "unwritable"])
def test_a_bad_teacher_cache_directory_is_refused_before_the_teacher_loads(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import promcse.training.teacher as teacher

    notes = tmp_path / "notes.txt"
    notes.write_text("not a directory\n")
    where = {"file": notes, "under_file": notes / "cache", "unwritable": UNWRITABLE}[case]
    forbid(monkeypatch, teacher, "load")
    with pytest.raises(PromcseError) as err:
        teacher.build_teacher_cache("some-teacher", ["a dog runs", "a cat sleeps"], where, device="cpu",
                                    show_progress=False)
    assert err.value.key == "loss.distill_cache" and err.value.path == str(where)
    expected = {"file": "exists and is not a directory", "under_file": f"{notes} is a file, not a directory",
                "unwritable": "cannot write in /proc"}[case]
    assert expected in err.value.message


def test_train_refuses_a_distill_cache_that_is_a_file_before_any_model_loads(
        tiny_bert: Path, tiny_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import promcse.training.teacher as teacher
    import promcse.training.train as train_module
    from promcse.training.config import load_config

    notes = tmp_path / "cache.txt"
    notes.write_text("a file\n")
    config = load_config(None, [
        f"model.backbone={tiny_bert}", "model.prompt_length=4", f"data.train_file={tiny_data['csv']}",
        f"data.eval_data_dir={tiny_data['data_dir']}", "train.batch_size=8", "train.max_steps=2",
        f"loss.distill_teacher={tiny_bert}", f"loss.distill_cache={notes}"])
    forbid(monkeypatch, teacher, "load")
    forbid(monkeypatch, train_module, "load_backbone")
    with pytest.raises(PromcseError) as err:
        train_module.train(config, tmp_path / "run", show_progress=False)
    assert err.value.key == "loss.distill_cache" and err.value.path == str(notes)
    assert notes.read_text() == "a file\n"


def write_cache(tmp_path: Path, tiny_bert: Path) -> tuple[Path, Path, list[str]]:
    """A real teacher cache of two texts by the tiny BERT; returns (directory, its record, the texts)."""
    from promcse.training.teacher import build_teacher_cache

    texts = ["a dog runs", "a cat sleeps"]
    build_teacher_cache(str(tiny_bert), texts, tmp_path / "cache", device="cpu", show_progress=False)
    (record,) = sorted((tmp_path / "cache").glob("*.json"))
    return tmp_path / "cache", record, texts


@pytest.mark.parametrize("edit, key, message", [
    (lambda r: "[" * 100_000 + "]" * 100_000, None, "nested deeper"),
    (lambda r: json.dumps(r).replace('"rows": 2', '"rows": NaN'), None, "NaN is not JSON"),
    (lambda r: json.dumps([r]), None, "not a promcse teacher cache record"),
    (lambda r: json.dumps({**r, "version": 99}), "version", "newer promcse"),
    (lambda r: json.dumps({**r, "version": "1"}), "version", "expected a positive int"),
    (lambda r: json.dumps({**r, "rows": "2"}), "rows", "expected int"),
    (lambda r: json.dumps({**r, "sha256": None}), "sha256", "expected str"),
])
def test_a_teacher_cache_record_is_read_strictly(edit: Any, key: str | None, message: str, tiny_bert: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import promcse.training.teacher as teacher

    cache, record, texts = write_cache(tmp_path, tiny_bert)
    record.write_text(edit(json.loads(record.read_text())))
    forbid(monkeypatch, teacher, "load")
    with pytest.raises(PromcseError, match=message) as err:
        teacher.build_teacher_cache(str(tiny_bert), texts, cache, device="cpu", show_progress=False)
    assert err.value.path == str(record) and err.value.key == key


def test_a_read_only_complete_cache_is_still_used(tiny_bert: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Writability is asked of a cache only when vectors are to be written into it."""
    import promcse.training.teacher as teacher

    cache, _, texts = write_cache(tmp_path, tiny_bert)
    forbid(monkeypatch, teacher, "load")
    forbid(monkeypatch, teacher, "check_output_dir")
    assert teacher.build_teacher_cache(str(tiny_bert), texts, cache, device="cpu", show_progress=False).dim == 32


# --- 3. promcse mine's output -----------------------------------------------------------------------------------


def write_pairs(path: Path, n: int = 12) -> Path:
    sents = make_sentences(2 * n, seed=4)
    path.write_text("sent0,sent1\n" + "".join(f"{sents[2 * i]},{sents[2 * i + 1]}\n" for i in range(n)))
    return path


@pytest.mark.parametrize("case", ["directory", "under_file", "unwritable", "suffix"])
def test_mine_refuses_a_bad_output_before_any_work(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import promcse.io.data as data
    import promcse.models.loading as loading
    from promcse.cli import main

    pairs = write_pairs(tmp_path / "pairs.csv")
    (tmp_path / "notes.txt").write_text("x\n")
    (tmp_path / "out.csv").mkdir()
    output = {"directory": tmp_path / "out.csv", "under_file": tmp_path / "notes.txt" / "o.csv",
              "unwritable": UNWRITABLE / "o.csv", "suffix": tmp_path / "o.txt"}[case]
    forbid(monkeypatch, data, "read_training_file")
    forbid(monkeypatch, loading, "load")
    code = main(["mine", "--input", str(pairs), "--output", str(output), "--no-progress"])
    err = capsys.readouterr().err
    expected = {"directory": "is an existing directory", "under_file": "notes.txt is a file, not a directory",
                "unwritable": "cannot write in /proc", "suffix": "must end in .csv or .jsonl"}[case]
    named = f"error: --output {output}: " if case in ("directory", "suffix") else f"error: {output}: "
    assert code == 2 and named in err and expected in err, err  # the write probe names the path, not the option
    assert len(err.strip().splitlines()) == 1


def test_mine_refuses_a_hard_link_to_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from promcse.cli import main

    pairs = write_pairs(tmp_path / "pairs.csv")
    (tmp_path / "link.csv").hardlink_to(pairs)
    before = pairs.read_text()
    code = main(["mine", "--input", str(pairs), "--output", str(tmp_path / "link.csv"), "--no-progress"])
    assert code == 2 and "writing it would destroy the input" in capsys.readouterr().err
    assert pairs.read_text() == before


def test_write_mined_refuses_a_directory(tmp_path: Path) -> None:
    from promcse.corpus.mine_files import check_mined_output

    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(PromcseError, match="is an existing directory") as err:
        check_mined_output(tmp_path / "out.jsonl")
    assert err.value.key == "path" and err.value.path == str(tmp_path / "out.jsonl")


# --- 4. promcse export: output path, model card inputs -----------------------------------------------------------


def test_export_to_an_existing_file_or_under_one_is_refused_before_loading(
        tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import promcse.models.loading as loading
    from promcse.cli import main
    from promcse.export.sentence_transformers import export_sentence_transformers

    notes = tmp_path / "notes.md"
    notes.write_text("mine\n")
    forbid(monkeypatch, loading, "load")
    with pytest.raises(PromcseError, match="exists and is not a directory") as err:
        export_sentence_transformers(str(tiny_bert), notes)
    assert err.value.path == str(notes) and err.value.key == "output"
    with pytest.raises(PromcseError, match="notes.md is a file, not a directory"):
        export_sentence_transformers(str(tiny_bert), notes / "export")
    assert main(["export", "--model", str(tiny_bert), "--output", str(notes)]) == 2
    err_text = capsys.readouterr().err
    assert f"error: --output {notes}: exists and is not a directory" in err_text and "Traceback" not in err_text
    assert notes.read_text() == "mine\n"


@pytest.mark.parametrize("text, key, message", [
    ("{not json", None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object"),
    ("[" * 100_000 + "]" * 100_000, None, "nested deeper"),
    ('{"tasks": [1]}', "tasks", "expected an object of task results"),
    ('{"tasks": {"sts12": 70.1}}', "tasks.sts12", "expected an object, got float"),
    ('{"tasks": {"sts12": {"spearman": "high"}}}', "tasks.sts12.spearman", 'expected a finite number, got "high"'),
    ('{"tasks": {"sts12": {"spearman": true}}}', "tasks.sts12.spearman", "expected a finite number, got true"),
    ('{"tasks": {"sts12": {"n": 3}}}', "tasks.sts12.spearman", "expected a finite number, got null"),
    ('{"tasks": {"sts12": {"spearman": NaN}}}', None, "NaN is not JSON"),
    ('{"avg": ' + "9" * 5000 + "}", None, "digits"),
])
def test_malformed_eval_results_are_refused_naming_file_and_key(text: str, key: str | None, message: str,
                                                                tmp_path: Path) -> None:
    from promcse.export.sentence_transformers import read_eval_results

    path = tmp_path / "eval.json"
    path.write_text(text)
    with pytest.raises(PromcseError, match=message) as err:
        read_eval_results(path)
    assert err.value.path == str(path) and err.value.key == key


def test_eval_results_given_in_python_are_checked_before_the_model_loads(
        tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import promcse.models.loading as loading
    from promcse.export.sentence_transformers import export_sentence_transformers

    forbid(monkeypatch, loading, "load")
    with pytest.raises(PromcseError) as err:
        export_sentence_transformers(str(tiny_bert), tmp_path / "st", eval_results={"tasks": {"sts12": "70"}})
    assert err.value.key == "eval_results.tasks.sts12" and err.value.path is None


def test_the_card_leaves_out_a_checkpoints_non_numeric_scores(tiny_bert: Path, tmp_path: Path) -> None:
    """The checkpoint's own recorded scores are optional: one of the wrong type is not shown (the export works)."""
    from promcse.export.sentence_transformers import export_sentence_transformers, read_eval_results

    ckpt = make_prompt_checkpoint(tiny_bert, tmp_path / "ckpt", extra={
        "stsb_dev": "high", "step": {"x": 1}, "train_rows": 60, "run_config": {"data": "not an object"}})
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"tasks": {"sts|12\nx": {"spearman": 71.25, "n": 3}}, "avg": None}))
    out = export_sentence_transformers(str(ckpt), tmp_path / "st", eval_results=read_eval_results(results))
    card = (out / "README.md").read_text()
    assert "STS-B dev" not in card and "high" not in card
    assert "- Checkpoint step: ?" in card and "(60 rows)" in card and "- Data: `n/a`" in card
    assert "| sts\\|12 x | 71.25 |" in card
    ckpt_ok = make_prompt_checkpoint(tiny_bert, tmp_path / "ok", extra={"stsb_dev": 80.5})
    card = (export_sentence_transformers(str(ckpt_ok), tmp_path / "st2") / "README.md").read_text()
    assert "STS-B dev Spearman x100 at the saved step: 80.50" in card


# --- 5. damaged parquet pages -----------------------------------------------------------------------------------


def damaged_parquet(tmp_path: Path) -> Path:
    """A 20,000-row parquet file (4 row groups, uncompressed) with 64 bytes in its middle overwritten."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "corpus.parquet"
    texts = [f"sentence number {i} " + "word " * (i % 13) for i in range(20_000)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=5_000, compression="NONE")
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    return path


def test_a_damaged_parquet_page_names_the_file_and_row(tmp_path: Path) -> None:
    from promcse.io.corpus_files import iter_corpus

    path = damaged_parquet(tmp_path)
    seen = 0
    with pytest.raises(PromcseError, match="cannot read parquet from this row on") as err:
        for _ in iter_corpus(path):
            seen += 1
    assert err.value.path == str(path) and err.value.line == seen + 1 and 0 < seen < 20_000
    assert (err.value.line - 1) % 4096 == 0  # the first row of the batch that failed to decode


def test_the_cli_reports_a_damaged_parquet_in_one_line(tiny_bert: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from promcse.cli import main

    path = damaged_parquet(tmp_path)
    code = main(["encode", "--model", str(tiny_bert), "--input", str(path), "--output", str(tmp_path / "vectors"),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "cannot read parquet" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
