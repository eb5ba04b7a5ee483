"""Output paths of ``promcse encode`` (one ``.npy`` file, or a shard directory) and ``promcse index build``.

A bad output (under a regular file, in /proc, the input itself, a directory where a file belongs and vice
versa, a directory holding other files) stops the command with exit 2 and one message naming the path
*before* the model loads: ``promcse.models.loading.load`` is replaced by a function that fails the test. Missing
parent directories are created, as for every promcse output. The single ``.npy`` file is written atomically:
a write that fails part-way leaves nothing under the final name. Each command names what it wrote.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import promcse.models.loading
from conftest import make_sentences
from promcse.cli import main
from promcse.errors import PromcseError

TEXTS = make_sentences(12, seed=4)


def never_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded before the output path was checked")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "s.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    (tmp_path / "file.txt").write_text("not a directory\n", encoding="utf-8")
    (tmp_path / "texts.npy").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")  # text that ends in .npy
    (tmp_path / "d.npy").mkdir()
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "notes.md").write_text("mine\n", encoding="utf-8")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    (tmp_path / "holder").mkdir()
    (tmp_path / "holder" / "c.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.npy")
    return tmp_path


ENCODE = ["encode", "--model", "unused", "--device", "cpu"]
CASES = [  # (input, output, message); "{tmp}" is the workspace
    # one .npy file
    ("{tmp}/s.txt", "{tmp}/file.txt/v.npy", "file.txt is a file, not a directory"),
    ("{tmp}/s.txt", "{tmp}/file.txt/deeper/v.npy", "file.txt is a file, not a directory"),
    ("{tmp}/s.txt", "/proc/promcse-no-such-dir/v.npy", "cannot write in /proc"),
    ("{tmp}/texts.npy", "{tmp}/texts.npy", "is the input file"),
    ("{tmp}/s.txt", "{tmp}/d.npy", "is an existing directory"),
    ("{tmp}/s.txt", "{tmp}/fifo.npy", "not a regular file"),
    # a shard directory
    ("{tmp}/s.txt", "{tmp}/file.txt", "must be a directory (or end in .npy"),
    ("{tmp}/s.txt", "{tmp}/file.txt/vectors", "file.txt is a file, not a directory"),
    ("{tmp}/s.txt", "/proc/promcse-no-such-dir/vectors", "cannot write in /proc"),
    ("{tmp}/s.txt", "{tmp}/others", "holds files that are not part of a vector directory ('notes.md')"),
    ("{tmp}/holder/c.txt", "{tmp}/holder", "--output {tmp}/holder: contains the input"),
    ("{tmp}/corpus", "{tmp}/corpus/vectors", "inside the input directory"),
    ("{tmp}/corpus", "{tmp}/corpus", "--output {tmp}/corpus: contains the input"),
]


@pytest.mark.parametrize("source,output,message", CASES)
def test_encode_refuses_bad_outputs_before_loading_the_model(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], source: str,
                                                             output: str, message: str) -> None:
    if "fifo" in output and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    monkeypatch.setattr(promcse.models.loading, "load", never_load)
    before = sorted(p.relative_to(workspace).as_posix() for p in workspace.rglob("*"))
    argv = ENCODE + ["--input", source.format(tmp=workspace), "--output", output.format(tmp=workspace)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=workspace) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(workspace).as_posix() for p in workspace.rglob("*")) == before  # nothing written


INDEX_CASES = [
    (["--input", "{tmp}/s.txt"], "{tmp}/file.txt", "is not a directory"),
    (["--input", "{tmp}/s.txt"], "{tmp}/file.txt/idx", "file.txt is a file, not a directory"),
    (["--input", "{tmp}/s.txt"], "/proc/promcse-no-such-dir/idx", "cannot write in /proc"),
    (["--input", "{tmp}/s.txt"], "{tmp}/others", "not part of a promcse index ('notes.md')"),
    (["--input", "{tmp}/holder/c.txt"], "{tmp}/holder", "--output {tmp}/holder: contains the input"),
    (["--from-vectors", "{tmp}/corpus"], "{tmp}/corpus", "--output {tmp}/corpus: contains the input"),
]


@pytest.mark.parametrize("source,output,message", INDEX_CASES)
def test_index_build_refuses_bad_outputs_before_any_work(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], source: list[str],
                                                         output: str, message: str) -> None:
    import promcse.io.data
    import promcse.corpus.search

    monkeypatch.setattr(promcse.models.loading, "load", never_load)
    monkeypatch.setattr(promcse.corpus.search, "build_from_vectors", never_load)
    monkeypatch.setattr(promcse.io.data, "read_sentences", never_load)
    argv = ["index", "build", "--model", "unused", "--device", "cpu", "--output", output.format(tmp=workspace)]
    assert main(argv + [part.format(tmp=workspace) for part in source]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=workspace) in err and "Traceback" not in err, err
    assert (workspace / "others" / "notes.md").read_text(encoding="utf-8") == "mine\n"  # never replaced


def test_missing_parents_are_created_and_each_command_names_what_it_wrote(
        tiny_bert: Path, workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npy = workspace / "new" / "sub" / "v.npy"
    assert main(ENCODE[:2] + [str(tiny_bert), "--device", "cpu", "--input", str(workspace / "s.txt"),
                              "--output", str(npy)]) == 0
    assert f"wrote {len(TEXTS)} x 32 embeddings (float32) to file {npy}" in capsys.readouterr().out
    assert np.load(npy).shape == (len(TEXTS), 32)
    assert sorted(os.listdir(npy.parent)) == ["v.npy"]  # no temporary left beside it
    shards = workspace / "new2" / "vectors"
    assert main(ENCODE[:2] + [str(tiny_bert), "--device", "cpu", "--input", str(workspace / "s.txt"),
                              "--output", str(shards), "--shard-size", "5", "--no-progress"]) == 0
    assert f"wrote 3 shard(s), 12 of 12 rows (float32, dim 32) to directory {shards}" in capsys.readouterr().out
    idx = workspace / "new3" / "idx"
    assert main(["index", "build", "--model", str(tiny_bert), "--input", str(workspace / "s.txt"), "--output",
                 str(idx), "--device", "cpu", "--no-progress"]) == 0
    assert f"indexed 12 texts (flat, dim 32) into directory {idx}" in capsys.readouterr().out
    # an existing index (or shard directory) is a valid output: replaced whole / resumed
    assert main(["index", "build", "--from-vectors", str(shards), "--output", str(idx), "--no-progress"]) == 0
    assert f"indexed 12 vectors (flat, dim 32) into directory {idx}" in capsys.readouterr().out


def test_a_failed_npy_write_leaves_nothing_under_the_final_name(tiny_bert: Path, workspace: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = np.save

    def disk_full(file: object, array: np.ndarray, *args: object, **kwargs: object) -> None:
        handle = open(file, "wb") if isinstance(file, (str, Path)) else file
        real_save(handle, array[:1])  # a valid header and one row, then the disk is full
        handle.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    out = workspace / "v.npy"
    with pytest.raises(OSError, match="No space"):
        main(ENCODE[:2] + [str(tiny_bert), "--device", "cpu", "--input", str(workspace / "s.txt"),
                           "--output", str(out)])
    assert not out.exists()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".v.npy")]  # the temporary is gone too


def test_a_hard_link_to_the_input_is_the_input(tmp_path: Path) -> None:
    from promcse.io.files import check_output_file

    source = tmp_path / "s.npy"
    source.write_text("a\n", encoding="utf-8")
    os.link(source, tmp_path / "same.npy")
    with pytest.raises(PromcseError, match="is the input file"):
        check_output_file(tmp_path / "same.npy", inputs=[source])
    assert check_output_file(tmp_path / "other.npy", inputs=[source]) == tmp_path / "other.npy"


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_directory_is_refused(tmp_path: Path) -> None:
    from promcse.io.files import check_output_dir, check_output_file

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PromcseError, match="cannot write in"):
            check_output_file(locked / "v.npy")
        with pytest.raises(PromcseError, match="cannot write in"):
            check_output_dir(locked / "vectors")
    finally:
        locked.chmod(0o700)
