"""Indexes and corpus manifests refuse what would make them answer wrongly, naming the file and the key.

- Non-finite vectors (NaN, +-inf; fp16 overflow; a NaN int8 scale) are refused by ``Index.add_vectors``,
  ``Index.add``, ``build_from_vectors`` and ``promcse index build --from-vectors``, naming the shard file and row.
- Every field of an index's ``meta.json`` is checked on load: types, ranges, the keys each backend needs, the
  ``store`` entry, unknown keys; and the ``index.faiss`` it sits with must be of its backend, size and settings.
- ``--from-vectors`` verifies each shard file's sha256 against the manifest before reading it; a missing store
  directory is named as such.
- Search arguments (``top_k``, ``threshold``, ``nprobe``, ``ef_search``, ``rescore``, the queries) out of range or
  of the wrong type are a PromcseError keyed by the argument, never a FAISS crash or a silently wrong answer.
- A shard manifest is read strictly: a shard index given as a string, huge or negative integers, wrong types,
  unknown keys, file names that leave the directory, JSON past the parser's limits.

Vectors are tiny (300 x 16) and the trained kinds use small settings so FAISS trains in milliseconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from unittest import mock
from typing import Any

import numpy as np
import pytest

from promcse.cli import main
from promcse.corpus.search import FAISS_FILE, META_FILE, Index, build_from_vectors
from promcse.corpus.shards import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest, write_manifest, write_shard
from promcse.errors import PromcseError
from promcse.io.files import sha256_file

pytest.importorskip("faiss")

N, DIM, SHARD = 300, 16, 100
KINDS: dict[str, dict[str, int]] = {"flat": {}, "ivf": {"nlist": 4}, "ivfpq": {"nlist": 4, "pq_m": 4, "pq_bits": 4},
                                    "hnsw": {"hnsw_m": 8}, "int8": {}, "binary": {}}
COMPRESSED = ("ivfpq", "int8", "binary")
DELETE = object()  # a meta/manifest value meaning: remove the key


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return unit(np.random.default_rng(11).normal(size=(N, DIM)))


def build(kind: str, vectors: np.ndarray) -> Index:
    index = Index(None, kind=kind, model_ref="none", **KINDS[kind])
    index.add_vectors([f"t{i}" for i in range(len(vectors))], vectors)
    return index


@pytest.fixture(scope="module")
def saved(vectors: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every FAISS kind, built once and saved (cases copy the directory before damaging it)."""
    root = tmp_path_factory.mktemp("saved")
    return {kind: build(kind, vectors).save(root / kind) for kind in KINDS}


def copy_of(saved: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[kind], tmp_path / kind))


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data), encoding="utf-8")


def write_shards(root: Path, vectors: np.ndarray, dtype: str = "float32") -> Path:
    """A shard directory as ``promcse encode`` writes it (shards of 100 rows, ids d0, d1, ...)."""
    root.mkdir(parents=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "minilm", "dim": vectors.shape[1],
                "dtype": dtype, "normalize": True, "shard_size": SHARD, "with_texts": True, "input": {},
                "part": None, "complete": True, "total_rows": len(vectors), "shards": []}
    for number, start in enumerate(range(0, len(vectors), SHARD)):
        chunk = vectors[start:start + SHARD]
        ids = [f"d{i}" for i in range(start, start + len(chunk))]
        # The poisoned shards of the tests below: today's writer refuses non-finite vectors, so they stand for
        # shards an older promcse (or another tool) wrote; the reader must still refuse them.
        with np.errstate(invalid="ignore", over="ignore"), \
                mock.patch("promcse.corpus.shards.refuse_non_finite", lambda *args: None):
            entry = write_shard(root, number, start, chunk, ids, [f"text {i}" for i in ids], dtype)
        manifest["shards"].append(entry)
    manifest["num_shards"] = len(manifest["shards"])
    write_manifest(root, manifest)
    return root


# --- non-finite vectors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", [*KINDS, "numpy"])
def test_add_vectors_refuses_non_finite_values(kind: str, bad: float, vectors: np.ndarray) -> None:
    poisoned = vectors.copy()
    poisoned[7, 3] = bad
    index = Index(None, kind=kind, model_ref="none", **KINDS.get(kind, {}))
    with pytest.raises(PromcseError, match="row 7 holds NaN or infinite"):
        index.add_vectors([f"t{i}" for i in range(N)], poisoned)
    assert len(index) == 0
    index.add_vectors([f"t{i}" for i in range(N)], vectors)  # a good batch still goes in
    second = Index(None, kind=kind, model_ref="none", **KINDS.get(kind, {}))
    second.add_vectors([f"t{i}" for i in range(N)], vectors)
    with pytest.raises(PromcseError, match="row 7 holds NaN"):  # a later batch, after training
        second.add_vectors([f"u{i}" for i in range(N)], poisoned)
    assert len(second) == N


def test_add_refuses_an_encoder_that_gives_nan(vectors: np.ndarray) -> None:
    class NanEncoder:
        def encode(self, texts: list[str], **_: Any) -> np.ndarray:
            out = vectors[:len(texts)].copy()
            out[1] = np.nan
            return out

    index = Index(NanEncoder(), kind="flat")
    with pytest.raises(PromcseError, match="the encoder gave NaN or infinite values for text 1 \\('b'\\)"):
        index.add(["a", "b", "c"])
    assert len(index) == 0


SHARD_POISON: dict[str, tuple[str, Callable[[np.ndarray], None], str]] = {
    "float32-nan": ("float32", lambda v: v.__setitem__((105, 2), np.nan), "shard-00001.npy"),
    "float32-inf": ("float32", lambda v: v.__setitem__((105, 2), np.inf), "shard-00001.npy"),
    "float16-overflow": ("float16", lambda v: v.__setitem__((105, 2), 1e6), "shard-00001.npy"),
    "int8-nan-scale": ("int8", lambda v: v.__setitem__((105, 2), np.nan), "shard-00001.scales.npy"),
}


@pytest.mark.parametrize("case", list(SHARD_POISON))
@pytest.mark.parametrize("kind", list(KINDS))
def test_build_from_vectors_refuses_non_finite_shards(kind: str, case: str, vectors: np.ndarray,
                                                      tmp_path: Path) -> None:
    dtype, poison, name = SHARD_POISON[case]
    poisoned = vectors.copy()
    poison(poisoned)
    root = write_shards(tmp_path / "vectors", poisoned, dtype)
    with pytest.raises(PromcseError, match="row 5 holds NaN or infinite") as caught:
        build_from_vectors(root, kind=kind, train_size=N, **KINDS[kind])
    assert caught.value.path == str(root / name)


def test_cli_from_vectors_names_the_poisoned_shard(vectors: np.ndarray, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    poisoned = vectors.copy()
    poisoned[250, 0] = np.nan
    root = write_shards(tmp_path / "vectors", poisoned)
    assert main(["index", "build", "--from-vectors", str(root), "--output", str(tmp_path / "idx"), "--kind", "ivf",
                 "--nlist", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'shard-00002.npy'}: row 50 holds NaN" in err and "Traceback" not in err
    assert not (tmp_path / "idx").exists()


# --- shard checksums and the rescoring store -----------------------------------------------------------------


@pytest.mark.parametrize("role", ["vectors", "rows", "scales"])
def test_from_vectors_verifies_each_shard_sha256_first(role: str, vectors: np.ndarray, tmp_path: Path) -> None:
    root = write_shards(tmp_path / "vectors", vectors, dtype="int8")
    name = {"vectors": "shard-00001.npy", "rows": "shard-00001.rows.jsonl", "scales": "shard-00001.scales.npy"}[role]
    if role == "rows":  # same ids, other texts: would index the wrong text under each id
        lines = (root / name).read_text(encoding="utf-8").replace("text d1", "text X")
        (root / name).write_text(lines, encoding="utf-8")
    else:  # same shape and type, other values
        array = np.load(root / name)
        np.save(root / name, array[::-1].copy(), allow_pickle=False)
    with pytest.raises(PromcseError, match="does not match the sha256") as caught:
        build_from_vectors(root, kind="flat")
    assert caught.value.path == str(root / name)


@pytest.mark.parametrize("kind", COMPRESSED)
def test_a_missing_store_directory_is_named(kind: str, vectors: np.ndarray, tmp_path: Path) -> None:
    root = write_shards(tmp_path / "vectors", vectors)
    out = build_from_vectors(root, kind=kind, train_size=N, **KINDS[kind]).save(tmp_path / "idx")
    root.rename(tmp_path / "moved")
    with pytest.raises(PromcseError, match="rescores from is gone") as caught:
        Index.load(out, encoder=object())
    assert caught.value.path == str(out / META_FILE) and caught.value.key == "store.path"


@pytest.mark.parametrize("kind", COMPRESSED)
def test_a_local_store_of_another_shape_is_refused(kind: str, saved: dict[str, Path], tmp_path: Path) -> None:
    out = copy_of(saved, kind, tmp_path)
    np.save(out / "store.npy", np.load(out / "store.npy")[:-1].copy(), allow_pickle=False)
    edit_json(out / META_FILE, files={**json.loads((out / META_FILE).read_text())["files"],
                                      "store.npy": {"bytes": (out / "store.npy").stat().st_size,
                                                    "sha256": sha256_file(out / "store.npy")}})
    with pytest.raises(PromcseError, match="expected 300 x 16 float vectors") as caught:
        Index.load(out, encoder=object())
    assert caught.value.path == str(out / "store.npy")


# --- meta.json, field by field -------------------------------------------------------------------------------

ALL = tuple(KINDS)
# (case id, key, value, kinds it applies to, the key the error names)
BAD_META: list[tuple[str, str, Any, tuple[str, ...], str]] = [
    *[(f"nprobe={v!r}", "nprobe", v, ALL, "nprobe") for v in (-1, 0, "4", 2.5, True, None, 10**30)],
    *[(f"ef_search={v!r}", "ef_search", v, ALL, "ef_search") for v in (-5, 0, "64", 2**31, None)],
    ("ef_construction=-1", "ef_construction", -1, ALL, "ef_construction"),
    *[(f"hnsw_m={v!r}", "hnsw_m", v, ALL, "hnsw_m") for v in (0, -8, "8", 10**6)],
    *[(f"rescore={v!r}", "rescore", v, ALL, "rescore") for v in (-1, "100", 1.5, False)],
    *[(f"nlist={v!r}", "nlist", v, ALL, "nlist") for v in (0, -4, "4", 2**41)],
    *[(f"pq_m={v!r}", "pq_m", v, ALL, "pq_m") for v in (0, -4, "4")],
    *[(f"pq_bits={v!r}", "pq_bits", v, ALL, "pq_bits") for v in (0, 17, -8)],
    *[(f"count={v!r}", "count", v, ALL, "count") for v in (-1, "300", N + 1, N - 1, DELETE)],
    *[(f"dim={v!r}", "dim", v, ALL, "dim") for v in (0, -16, "16", DIM + 8, 2**20, DELETE)],
    ("normalized=false", "normalized", False, ALL, "normalized"),
    ("normalized='yes'", "normalized", "yes", ALL, "normalized"),
    ("metric='l2'", "metric", "l2", ALL, "metric"),
    ("model=5", "model", 5, ALL, "model"),
    ("versions='1.0'", "versions", "1.0", ALL, "versions"),
    ("unknown-key", "nprobes", 4, ALL, "nprobes"),
    ("backend=3", "backend", 3, ALL, "backend"),
    # the keys a backend needs, and values that disagree with index.faiss
    *[(f"no-{k}", k, DELETE, ("ivf", "ivfpq"), k) for k in ("nlist", "nprobe")],
    *[(f"null-{k}", k, None, ("ivfpq",), k) for k in ("nlist", "pq_m", "pq_bits")],
    *[(f"no-{k}", k, DELETE, ("hnsw",), k) for k in ("hnsw_m", "ef_construction", "ef_search")],
    ("nlist-differs", "nlist", 5, ("ivf", "ivfpq"), "nlist"),
    ("pq_m-differs", "pq_m", 8, ("ivfpq",), "pq_m"),
    ("pq_bits-differs", "pq_bits", 8, ("ivfpq",), "pq_bits"),
    ("hnsw_m-differs", "hnsw_m", 16, ("hnsw",), "hnsw_m"),
    # the store: required by the compressed kinds, a known shape, nothing for the exact kinds
    ("no-store", "store", DELETE, COMPRESSED, "store"),
    ("null-store", "store", None, COMPRESSED, "store"),
    ("store-kind", "store", {"kind": "elsewhere"}, COMPRESSED, "store.kind"),
    ("store-file", "store", {"kind": "local", "file": "../store.npy"}, COMPRESSED, "store.file"),
    ("store-extra", "store", {"kind": "local", "file": "store.npy", "mode": "r"}, COMPRESSED, "store.mode"),
    ("store-path", "store", {"kind": "shards", "path": "rel/dir", "manifest_sha256": "0" * 64}, COMPRESSED,
     "store.path"),
    ("store-sha", "store", {"kind": "shards", "path": "/tmp", "manifest_sha256": "x"}, COMPRESSED,
     "store.manifest_sha256"),
    ("store-on-exact", "store", {"kind": "local", "file": "store.npy"}, ("flat", "ivf", "hnsw"), "store"),
    ("store-not-object", "store", "store.npy", ALL, "store"),
]
META_CASES = [pytest.param(kind, key, value, named, id=f"{kind}-{case}")
              for case, key, value, kinds, named in BAD_META for kind in kinds]


@pytest.mark.parametrize(("kind", "key", "value", "named"), META_CASES)
def test_every_meta_field_is_checked_on_load(kind: str, key: str, value: Any, named: str, saved: dict[str, Path],
                                             tmp_path: Path) -> None:
    out = copy_of(saved, kind, tmp_path)
    edit_json(out / META_FILE, **{key: value})
    with pytest.raises(PromcseError) as caught:
        Index.load(out, encoder=object())
    assert (caught.value.path, caught.value.key) == (str(out / META_FILE), named), caught.value


@pytest.mark.parametrize("text", ['"nprobe": ' + "9" * 5000, '"nprobe": NaN', '"versions": ' + "[" * 100_000],
                         ids=["5000-digit-int", "NaN", "deep-nesting"])
def test_meta_json_past_the_parser_limits_is_refused(text: str, saved: dict[str, Path], tmp_path: Path) -> None:
    out = copy_of(saved, "ivf", tmp_path)
    raw = (out / META_FILE).read_text(encoding="utf-8")
    (out / META_FILE).write_text(raw.replace('"nprobe": 16', text), encoding="utf-8")
    with pytest.raises(PromcseError, match="invalid JSON|nested deeper") as caught:
        Index.load(out, encoder=object())
    assert caught.value.path == str(out / META_FILE)


MISMATCHED = [(meta_kind, faiss_kind) for meta_kind in ("flat", "ivf", "ivfpq", "hnsw", "int8")
              for faiss_kind in ("flat", "ivf", "ivfpq", "hnsw", "int8") if meta_kind != faiss_kind]


@pytest.mark.parametrize(("meta_kind", "faiss_kind"), MISMATCHED, ids=[f"{m}-over-{f}" for m, f in MISMATCHED])
def test_an_index_faiss_of_another_kind_is_refused(meta_kind: str, faiss_kind: str, saved: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """``meta.json`` of one kind beside the (checksummed) ``index.faiss`` of another: refused, not an
    AttributeError or answers from the wrong structure."""
    out = copy_of(saved, meta_kind, tmp_path)
    shutil.copyfile(saved[faiss_kind] / FAISS_FILE, out / FAISS_FILE)
    files = json.loads((out / META_FILE).read_text())["files"]
    files[FAISS_FILE] = json.loads((saved[faiss_kind] / META_FILE).read_text())["files"][FAISS_FILE]
    edit_json(out / META_FILE, files=files)
    with pytest.raises(PromcseError, match=f"backend '{meta_kind}'") as caught:
        Index.load(out, encoder=object())
    assert (caught.value.path, caught.value.key) == (str(out / META_FILE), "backend")


# --- search-time arguments and Index settings ----------------------------------------------------------------

BAD_SEARCH: list[tuple[str, Any]] = [
    *[("nprobe", v) for v in (-1, 0, "2", 2.5, True, 2**31)],
    *[("ef_search", v) for v in (-1, 0, "8", 2**31)],
    *[("rescore", v) for v in (-1, "5", 1.5)],
    *[("top_k", v) for v in (-1, "3", 2.5, True)],
    *[("threshold", v) for v in (float("nan"), "0.5", float("inf"))],
    *[("queries", v) for v in ("nan", "dim", "1-d", "text")],
]


def queries_for(value: str, vectors: np.ndarray) -> Any:
    if value == "nan":
        q = vectors[:2].copy()
        q[1, 0] = np.nan
        return q
    return {"dim": vectors[:2, :DIM - 1], "1-d": vectors[0], "text": [["a", "b"]]}[value]


@pytest.mark.parametrize(("key", "value"), BAD_SEARCH, ids=[f"{k}={v!r}" for k, v in BAD_SEARCH])
@pytest.mark.parametrize("kind", ALL)
def test_search_arguments_out_of_range_are_refused(kind: str, key: str, value: Any, saved: dict[str, Path],
                                                   vectors: np.ndarray) -> None:
    index = Index.load(saved[kind], encoder=object())
    queries = queries_for(value, vectors) if key == "queries" else vectors[:2]
    arguments = {} if key == "queries" else {key: value}
    with pytest.raises(PromcseError) as caught:
        index.search_vectors(queries, **{"top_k": 3, **arguments})
    assert caught.value.key == key and caught.value.path is None


@pytest.mark.parametrize(("key", "value"), [("nprobe", -1), ("ef_search", 0), ("rescore", -5), ("hnsw_m", 1),
                                            ("pq_bits", 40), ("nlist", 0), ("pq_m", "4")])
def test_index_settings_out_of_range_are_refused(key: str, value: Any) -> None:
    with pytest.raises(PromcseError) as caught:
        Index(None, kind="hnsw", **{key: value})
    assert caught.value.key == key


def test_cli_search_shows_a_meta_key_as_the_files_not_a_flag(saved: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(saved, "hnsw", tmp_path)
    edit_json(out / META_FILE, ef_search=-5)
    assert main(["index", "search", "--index", str(out), "--query", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{out / META_FILE}, key 'ef_search': -5 is outside 1..2147483647" in err and "--ef-search" not in err


# --- shard manifests ----------------------------------------------------------------------------------------


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        target = manifest
        for part in path[:-1]:
            target = target[part]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return change


BAD_MANIFEST: list[tuple[str, list[Any], Any, str]] = [
    ("index-as-string", ["shards", 0, "index"], "0", "shards[0].index"),
    ("negative-rows", ["shards", 1, "rows"], -5, "shards[1].rows"),
    ("rows-past-shard-size", ["shards", 1, "rows"], 150, "shards[1].rows"),
    ("float-rows", ["shards", 1, "rows"], 100.0, "shards[1].rows"),
    ("negative-start", ["shards", 0, "start"], -100, "shards[0].start"),
    ("start-off-grid", ["shards", 1, "start"], 50, "shards[1].start"),
    ("huge-total", ["total_rows"], 10**30, "total_rows"),
    ("total-as-string", ["total_rows"], "300", "total_rows"),
    ("negative-total", ["total_rows"], -1, "total_rows"),
    ("no-total", ["total_rows"], DELETE, "total_rows"),
    ("shards-as-string", ["num_shards"], "3", "num_shards"),
    ("shards-disagree", ["num_shards"], 5, "num_shards"),
    ("dim-as-string", ["dim"], "16", "dim"),
    ("zero-dim", ["dim"], 0, "dim"),
    ("dtype", ["dtype"], "float64", "dtype"),
    ("normalize-as-string", ["normalize"], "yes", "normalize"),
    ("complete-as-int", ["complete"], 1, "complete"),
    ("zero-shard-size", ["shard_size"], 0, "shard_size"),
    ("null-with-texts", ["with_texts"], None, "with_texts"),
    ("model-as-int", ["model"], 3, "model"),
    ("input-as-string", ["input"], "corpus.txt", "input"),
    ("part-index", ["part"], {"index": 3, "count": 2}, "part.index"),
    ("part-count", ["part"], {"index": 0, "count": 1}, "part.count"),
    ("shards-as-object", ["shards"], {}, "shards"),
    ("entry-as-int", ["shards", 0], 5, "shards[0]"),
    ("name-escapes", ["shards", 0, "files", "vectors", "name"], "../../etc/passwd", "shards[0].files.vectors.name"),
    ("name-not-a-shard", ["shards", 0, "files", "vectors", "name"], "notes.npy", "shards[0].files.vectors.name"),
    ("bad-sha256", ["shards", 0, "files", "vectors", "sha256"], "abc", "shards[0].files.vectors.sha256"),
    ("no-rows-file", ["shards", 0, "files", "rows"], DELETE, "shards[0].files.rows"),
    ("entry-extra", ["shards", 0, "extra"], 1, "shards[0].extra"),
    ("unknown-key", ["note"], "x", "note"),
    ("duplicate-shard", ["shards", 2, "index"], 1, "shards[2].start"),
]


@pytest.fixture(scope="module")
def shard_dir(vectors: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards") / "vectors", vectors)


@pytest.mark.parametrize(("path", "value", "named"), [c[1:] for c in BAD_MANIFEST], ids=[c[0] for c in BAD_MANIFEST])
def test_manifest_fields_are_read_strictly(path: list[Any], value: Any, named: str, shard_dir: Path,
                                           tmp_path: Path) -> None:
    root = Path(shutil.copytree(shard_dir, tmp_path / "vectors"))
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    _set(path, value)(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(PromcseError) as caught:
        read_manifest(root)
    assert (caught.value.path, caught.value.key) == (str(root / MANIFEST), named), caught.value


@pytest.mark.parametrize("text", ['"total_rows": ' + "9" * 5000, '"total_rows": NaN', '"input": ' + "[" * 100_000],
                         ids=["5000-digit-int", "NaN", "deep-nesting"])
def test_manifest_json_past_the_parser_limits_is_refused(text: str, shard_dir: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(shard_dir, tmp_path / "vectors"))
    raw = (root / MANIFEST).read_text(encoding="utf-8")
    (root / MANIFEST).write_text(raw.replace('"total_rows": 300', text), encoding="utf-8")
    with pytest.raises(PromcseError, match="invalid JSON|nested deeper") as caught:
        read_manifest(root)
    assert caught.value.path == str(root / MANIFEST)


def test_cli_from_vectors_names_the_manifest_key(shard_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(shutil.copytree(shard_dir, tmp_path / "vectors"))
    edit_json(root / MANIFEST, shards=[dict(e, index=str(e["index"]))
                                       for e in json.loads((root / MANIFEST).read_text())["shards"]])
    assert main(["index", "build", "--from-vectors", str(root), "--output", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert f"{root / MANIFEST}, key 'shards[0].index': expected int" in err and "Traceback" not in err


def test_encode_resume_reads_the_manifest_strictly(tiny_bert: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.txt").write_text("\n".join(f"a man plays {i}" for i in range(30)) + "\n", encoding="utf-8")
    argv = ["encode", "--model", str(tiny_bert), "--input", str(tmp_path / "c.txt"), "--output",
            str(tmp_path / "v"), "--shard-size", "10", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "v" / MANIFEST).read_text())
    manifest["shards"][1]["rows"] = -5
    (tmp_path / "v" / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    capsys.readouterr()
    assert main(argv) == 2
    assert f"{tmp_path / 'v' / MANIFEST}, key 'shards[1].rows'" in capsys.readouterr().err
