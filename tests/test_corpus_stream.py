"""Reliability issue, part 4: ``promcse encode --output DIR`` streams within a shard.

A shard is encoded ``chunk_rows`` rows at a time (in the longest-first order of one call over the whole shard) and
its files are filled as the chunks come (:class:`promcse.corpus.shard_writer.ShardWriter`), so memory no longer
grows with the shard. The files and manifest stay byte-identical to the whole-shard writer's
(:func:`promcse.corpus.shards.write_shard`, which the Ray engine still uses).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_sentences
from promcse.corpus import encode as corpus
from promcse.corpus.encode import EncodeJob, encode_corpus, store_shard
from promcse.corpus.shard_writer import ShardWriter, npy_header
from promcse.corpus.shards import write_shard
from promcse.encoder.encode import encode_texts
from promcse.errors import PromcseError

ROWS, SHARD, CHUNK, BATCH = 45, 20, 7, 3  # chunks (6 rows: whole batches) smaller than a shard, 3 shards


@pytest.fixture(scope="module")
def encoder(tiny_bert: Path) -> Any:
    import promcse

    return promcse.load(str(tiny_bert), device="cpu")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(make_sentences(ROWS, seed=5)) + "\n", encoding="utf-8")
    return path


def sha256s(root: Path) -> dict[str, str]:
    """Every file of a directory (temporaries included) and its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def whole_shard(encoder: Any, job: EncodeJob, manifest: dict[str, Any], index: int, start: int,
                chunk: list[tuple[Any, str]]) -> None:
    """The encode before streaming: one encode_texts call over the shard, then write_shard (via store_shard)."""
    texts = [text for _, text in chunk]
    vectors = encode_texts(encoder, texts, batch_size=job.batch_size, normalize=job.normalize,
                           max_length=job.max_length)
    store_shard(job, manifest, index, start, vectors, [rid for rid, _ in chunk], texts)


def truncation_warnings(run: Any) -> int:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run()
    return sum("token limit" in str(w.message) for w in seen)


@pytest.mark.parametrize("dtype,with_texts,max_length", [("float32", True, None), ("float16", False, None),
                                                         ("int8", True, 5)])
def test_streamed_shards_are_byte_identical_to_the_whole_shard_writer(
        encoder: Any, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, with_texts: bool,
        max_length: int | None) -> None:
    job = lambda out: EncodeJob(source, tmp_path / out, shard_size=SHARD, dtype=dtype, batch_size=BATCH,  # noqa: E731
                                chunk_rows=CHUNK, with_texts=with_texts, max_length=max_length)
    streamed = truncation_warnings(lambda: encode_corpus(encoder, job("streamed"), "m"))
    with monkeypatch.context() as patch:
        patch.setattr(corpus, "_encode_shard", whole_shard)
        whole = truncation_warnings(lambda: encode_corpus(encoder, job("whole"), "m"))
    files = sha256s(tmp_path / "whole")
    assert len(files) == 1 + 3 * (3 if dtype == "int8" else 2)  # the manifest and every shard's files, no more
    assert sha256s(tmp_path / "streamed") == files
    assert streamed == whole == (3 if max_length else 0)  # one truncation warning per shard, as before


class TokenizerSpy:
    """The encoder's tokenizer, recording how many texts each call tokenizes."""

    def __init__(self, real: Any, sizes: list[int]) -> None:
        self.real, self.sizes = real, sizes

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.sizes.append(len(texts))
        return self.real(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_streaming_never_encodes_more_than_a_chunk_at_once(encoder: Any, source: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []
    tokenized: list[int] = []
    real = corpus.encode_texts
    monkeypatch.setattr(corpus, "encode_texts", lambda enc, t, **kw: encoded.append(len(t)) or real(enc, t, **kw))
    monkeypatch.setattr(encoder, "tokenizer", TokenizerSpy(encoder.tokenizer, tokenized))
    manifest = encode_corpus(encoder, EncodeJob(source, tmp_path / "out", shard_size=SHARD, batch_size=BATCH,
                                                chunk_rows=CHUNK), "m")
    assert manifest["complete"] and manifest["total_rows"] == ROWS
    assert sum(encoded) == ROWS and max(encoded) <= CHUNK and max(tokenized) <= CHUNK
    assert encoded == [6, 6, 6, 2, 6, 6, 6, 2, 5]  # whole batches of 3 per chunk of 7; shards of 20, 20, 5


def test_a_chunk_holds_at_least_one_batch_and_bad_sizes_are_refused(encoder: Any, source: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []
    real = corpus.encode_texts
    monkeypatch.setattr(corpus, "encode_texts", lambda enc, t, **kw: encoded.append(len(t)) or real(enc, t, **kw))
    encode_corpus(encoder, EncodeJob(source, tmp_path / "out", shard_size=SHARD, batch_size=8, chunk_rows=3), "m")
    assert encoded == [8, 8, 4, 8, 8, 4, 5]
    for key in ("chunk_rows", "batch_size"):
        with pytest.raises(PromcseError, match="at least 1") as err:
            encode_corpus(encoder, EncodeJob(source, tmp_path / key, **{key: 0}), "m")  # type: ignore[arg-type]
        assert err.value.key == key


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_writer_fills_rows_in_any_order_like_write_shard(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(37, 12)).astype(np.float32) * rng.uniform(0.1, 3, size=(37, 1)).astype(np.float32)
    vectors[5] = 0.0  # an all-zero row: int8 scale 0
    ids: list[Any] = [f"doc-{i}" if i % 2 else i for i in range(37)]
    texts = [f"text {i} é ✓" for i in range(37)]
    expected = write_shard(tmp_path / "whole", 3, 60, vectors, ids, texts, dtype)
    (tmp_path / "streamed").mkdir()
    order = rng.permutation(37)
    with ShardWriter(tmp_path / "streamed", 3, 37, 12, dtype) as writer:
        for at in range(0, 37, 10):
            writer.add_rows(ids[at:at + 10], texts[at:at + 10])
        for at in range(0, 37, 8):
            writer.put(order[at:at + 8], vectors[order[at:at + 8]])
        assert all(p.name.startswith(".shard-00003.") and p.name.endswith(".tmp")
                   for p in (tmp_path / "streamed").iterdir())  # what a resumed encode removes after a kill
        entry = writer.finish(60)
    assert entry == expected
    assert sha256s(tmp_path / "streamed") == sha256s(tmp_path / "whole")


def test_npy_header_is_numpys() -> None:
    import io

    for shape, dtype in [((1, 384), "float32"), ((100_000, 1024), "float16"), ((7,), "float32"), ((99_999, 8), "int8")]:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, dtype), allow_pickle=False)
        header = npy_header(shape, dtype)
        data_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert buffer.getvalue()[:len(header)] == header and len(buffer.getvalue()) == len(header) + data_bytes


def test_a_failed_shard_leaves_no_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 0, 4, 3, "int8") as writer:
            writer.put([0, 1], np.ones((2, 3), np.float32))
            raise RuntimeError("the encoder failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PromcseError, match="2 of 4 rows were never written"):
        with ShardWriter(tmp_path, 0, 4, 3, "float16") as writer:
            writer.add_rows([0, 1, 2, 3], None)
            writer.put([3, 1], np.ones((2, 3), np.float32))
            writer.finish(0)
    with pytest.raises(PromcseError, match="positions"):
        with ShardWriter(tmp_path, 0, 4, 3, "float32") as writer:
            writer.put([4], np.ones((1, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_nan_vectors_never_reach_a_shard(tmp_path: Path) -> None:
    vectors = np.ones((4, 3), dtype=np.float32)
    vectors[2, 1] = np.nan
    (tmp_path / "s").mkdir()
    (tmp_path / "w").mkdir()
    with pytest.raises(PromcseError, match="row 6 of shard 1"):
        with ShardWriter(tmp_path / "s", 1, 8, 3, "float32") as writer:
            writer.put([4, 5, 6, 7], vectors)
    assert not list((tmp_path / "s").iterdir()), "nothing was left behind"
    with pytest.raises(PromcseError, match="row 2 of shard 0"):
        write_shard(tmp_path / "w", 0, 0, vectors, list(range(4)), None, "float16")
    assert not list((tmp_path / "w").iterdir())
