"""Corpus encode on Ray Data: the encoder as an actor pool (``map_batches``), the same shards and manifest.

``promcse encode --engine ray --workers N [--address ...]`` (:func:`encode_files`) and, from Python,
:func:`encode_dataset` (any ``ray.data.Dataset`` with a text column) run the encode of
:func:`promcse.corpus.encode.encode_corpus` on ``N`` Ray actors, one model each. Each actor reserves
``cpus_per_worker`` CPUs and runs as many torch threads, so the actors never oversubscribe a node's cores.

- ``encode_files``: ``map_batches`` of :class:`PartEncoder` over the ``N`` parts of the job, one per actor.
  Actor ``i`` streams the input with promcse's own strict readers (:func:`promcse.corpus.encode.iter_corpus`, as a
  ``--shard i/N`` job does) and encodes shards ``i, i+N, ...`` whole, each by one ``encode_texts`` call, so
  the shard files are byte-identical to a single process's (same model, dtype and torch threads). A
  resumed run skips the shards already written. The input must be readable at the same path on every node
  that runs an actor (each checks it has the same fingerprint as this process's copy).
- ``encode_dataset``: ``map_batches`` of :class:`BatchEncoder` over the dataset's rows, in order
  (Ray Data's ``preserve_order``); batches follow the dataset's blocks, not the shards, so the vectors agree
  with a single process to float rounding (~1e-7) rather than bit for bit.

Only this process writes: the encoded rows come back to it and every shard and the manifest are written
through :func:`promcse.corpus.encode.store_shard` (the whole-shard writer; a single-process encode streams each
shard through :class:`promcse.corpus.shard_writer.ShardWriter` into byte-identical files), so the output
directory need not be shared. Models must be readable at the same path (or hub name) on every node.

``ray`` is an optional extra (``pip install 'promcse[ray]'``), imported only when these functions run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from promcse.corpus.encode import EncodeJob, finish_manifest, fingerprint, resume_state, store_shard
from promcse.io.corpus_files import iter_corpus
from promcse.encoder.encode import encode_texts
from promcse.errors import PromcseError

VECTOR, SHARD, SHARD_ROWS, POSITION, ID_JSON = "_vector", "_shard", "_shard_rows", "_position", "_id_json"


@dataclass(frozen=True)
class RayEncodeConfig:
    """How the encode is spread over Ray.

    Attributes:
        workers: Actors, one model each.
        cpus_per_worker: CPUs Ray reserves per actor; also its torch threads (at least 1).
        gpus_per_worker: GPUs per actor (0: CPU only).
        device: Device each actor loads its model on (``cpu``, ``cuda``, ``auto``).
        address: A running Ray cluster (``auto``, ``HOST:6379``) for :func:`encode_files`; None: this
            process's Ray connection, else a new local instance.
    """

    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    device: str = "cpu"
    address: str | None = None

    def check(self) -> None:
        """Raises PromcseError for a pool Ray could not place."""
        if self.workers < 1:
            raise PromcseError(f"must be at least 1, got {self.workers}", key="workers")
        if not 0 < self.cpus_per_worker <= 1024:
            raise PromcseError(f"must be in (0, 1024], got {self.cpus_per_worker}", key="cpus_per_worker")
        if not 0 <= self.gpus_per_worker <= 64:
            raise PromcseError(f"must be in [0, 64], got {self.gpus_per_worker}", key="gpus_per_worker")


class _ActorModel:
    """What every encoding actor holds: the model (loaded once per actor), its torch threads and the job."""

    def __init__(self, model_ref: str, device: str, threads: int, job: EncodeJob) -> None:
        import torch

        from promcse.models.loading import load

        torch.set_num_threads(max(1, threads))
        self.encoder, self.job = load(model_ref, device=device), job

    def vectors(self, texts: list[str]) -> np.ndarray:
        """``texts`` encoded exactly as :func:`promcse.corpus.encode.encode_corpus` encodes a shard."""
        job = self.job
        return np.asarray(encode_texts(self.encoder, texts, batch_size=job.batch_size, normalize=job.normalize,
                                       max_length=job.max_length), dtype=np.float32)


class PartEncoder(_ActorModel):
    """``encode_files``' actor: given part ``i`` of ``N``, streams the input and encodes shards ``i, i+N, ...``."""

    def __init__(self, model_ref: str, device: str, threads: int, job: EncodeJob, parts: int, skip: list[int],
                 source: dict[str, Any]) -> None:
        super().__init__(model_ref, device, threads, job)
        self.parts, self.skip, self.source = parts, set(skip), source

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        job = self.job
        if fingerprint(job.input, full=job.full_hash, text_field=job.text_field, id_field=job.id_field) != self.source:
            raise PromcseError("the input differs on a Ray worker's node from this machine's copy (or changed "
                               "since the encode started)", path=job.input)
        for part in batch["part"].tolist():
            for index, start, chunk in self._shards(int(part)):
                rows, texts = len(chunk), [text for _, text in chunk]
                yield {SHARD: np.full(rows, index), SHARD_ROWS: np.full(rows, rows),
                       POSITION: np.arange(start, start + rows), job.text_field: np.asarray(texts, dtype=object),
                       ID_JSON: np.asarray([json.dumps(rid) for rid, _ in chunk], dtype=object),
                       VECTOR: self.vectors(texts)}

    def _shards(self, part: int) -> Iterator[tuple[int, int, list[tuple[Any, str]]]]:
        """(index, first row, rows) of this part's shards still to do, read as ``encode_corpus`` reads."""
        rows = iter_corpus(self.job.input, self.job.text_field, self.job.id_field)
        index = start = 0
        while chunk := list(islice(rows, self.job.shard_size)):
            if index % self.parts == part and index not in self.skip:
                yield index, start, chunk
            index, start = index + 1, start + len(chunk)


class BatchEncoder(_ActorModel):
    """``encode_dataset``'s actor: each batch of the dataset's rows gains its vectors."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        job = self.job
        texts = [_text(value, job.text_field) for value in batch[job.text_field].tolist()]
        kept = {job.id_field: batch[job.id_field]} if job.id_field else {}
        return {**kept, job.text_field: np.asarray(texts, dtype=object), VECTOR: self.vectors(texts)}


def _text(value: Any, field: str) -> str:
    """A dataset row's text, stripped as the file readers strip it."""
    if not isinstance(value, str) or not value.strip():
        raise PromcseError(f"empty, missing or non-text '{field}' in the dataset")
    return value.strip()


def _pool(config: RayEncodeConfig, **kwargs: Any) -> dict[str, Any]:
    """``map_batches`` arguments of the actor pool: fixed size, one task in flight per actor, resources."""
    import ray

    resources: dict[str, Any] = {"num_cpus": config.cpus_per_worker}
    if config.gpus_per_worker:
        resources["num_gpus"] = config.gpus_per_worker
    return {"batch_format": "numpy", "compute": ray.data.ActorPoolStrategy(size=config.workers,
                                                                           max_tasks_in_flight_per_actor=1),
            **resources, **kwargs}


def _write_by_shard(encoded: Any, job: EncodeJob, manifest: dict[str, Any]) -> int:
    """``encode_files``: gather each shard's rows (they come back in any order) and write it once complete;
    returns the corpus's row count."""
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    total = max((e["start"] + e["rows"] for e in manifest["shards"]), default=0)
    with tqdm(desc="encode", unit="rows", disable=not job.show_progress) as bar:
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for index in np.unique(batch[SHARD]).tolist():
                mine = batch[SHARD] == index
                pieces = pending.setdefault(index, [])
                pieces.append({name: column[mine] for name, column in batch.items()})
                rows = sum(len(piece[SHARD]) for piece in pieces)
                if rows == int(pieces[0][SHARD_ROWS][0]):
                    del pending[index]
                    shard = {name: np.concatenate([piece[name] for piece in pieces]) for name in batch}
                    order = np.argsort(shard[POSITION], kind="stable")
                    start = int(shard[POSITION][order[0]])
                    store_shard(job, manifest, index, start, shard[VECTOR][order],
                                [json.loads(v) for v in shard[ID_JSON][order].tolist()],
                                shard[job.text_field][order].tolist())
                    total = max(total, start + rows)
                    bar.update(rows)
    if pending:
        raise RuntimeError(f"Ray Data returned incomplete shards: {sorted(pending)}")
    return total


def _write_in_order(encoded: Any, job: EncodeJob, manifest: dict[str, Any], done: set[int]) -> int:
    """``encode_dataset``: cut the rows, in order, into shards; write those not already done; returns the
    row count."""
    total = 0
    with tqdm(desc="encode", unit="rows", disable=not job.show_progress) as bar:
        for index, batch in zip(count(), encoded.iter_batches(batch_size=job.shard_size, batch_format="numpy")):
            start, rows = index * job.shard_size, len(batch[VECTOR])
            ids = batch[job.id_field].tolist() if job.id_field else list(range(start, start + rows))
            if index not in done:
                store_shard(job, manifest, index, start, batch[VECTOR], ids, batch[job.text_field].tolist())
            total = start + rows
            bar.update(rows)
    return total


@contextmanager
def _order(context: Any, preserve: bool) -> Iterator[None]:
    """Ray Data keeps the rows' order (or not) for the duration; the previous setting is restored."""
    options = context.execution_options
    previous, options.preserve_order = options.preserve_order, preserve
    try:
        yield
    finally:
        options.preserve_order = previous


@contextmanager
def _unwrapped() -> Iterator[None]:
    """A reader's or an actor's PromcseError re-raised as itself, out of Ray's exception wrappers."""
    try:
        yield
    except Exception as err:
        found, seen = None, err
        for _ in range(20):  # Ray's RayTaskError(PromcseError) carries the remote traceback: take its cause
            if isinstance(seen, PromcseError) and type(seen).__module__.startswith("promcse"):
                found = seen
            seen = getattr(seen, "cause", None) or seen.__cause__
            if seen is None:
                break
        if found is None or found is err:
            raise
        raise found from None


def _model_dim(model_ref: str) -> int:
    """The model's embedding size (for the manifest), from one load on this process's CPU."""
    from promcse.models.loading import load

    return int(load(model_ref, device="cpu").dim)


def _check_job(job: EncodeJob) -> None:
    if job.shard_size < 1:
        raise PromcseError(f"must be at least 1, got {job.shard_size}", key="shard_size")
    if job.part != (0, 1):
        raise PromcseError(f"{job.part} splits an encode between separate jobs; the Ray engine spreads one job over "
                           "its workers: leave it at (0, 1)", key="part")


def encode_dataset(dataset: Any, job: EncodeJob, model_ref: str, config: RayEncodeConfig | None = None,
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode the rows of a ``ray.data.Dataset`` into ``job.output``'s shards; returns the final manifest.

    Rows are taken in the dataset's order; the text is column ``job.text_field``, the id column
    ``job.id_field`` (default: the row's position). ``job.input`` only names the data in messages.
    ``source`` is recorded as the manifest's input (default: the fields read); a re-run with the same
    ``source`` resumes, encoding the dataset again but writing only the shards missing. Ray must be
    initialised, with CPUs left for the dataset's own read tasks beyond ``workers x cpus_per_worker``.

    Raises:
        PromcseError: Bad settings, an empty or non-text row, or an output of another run.
    """
    config = config or RayEncodeConfig()
    config.check()
    _check_job(job)
    source = source or {"ray_dataset": True, "text_field": job.text_field, "id_field": job.id_field}
    manifest, done = resume_state(job, model_ref, _model_dim(model_ref), source)
    if manifest["complete"]:
        return manifest
    threads = int(config.cpus_per_worker)
    encoded = dataset.map_batches(BatchEncoder, **_pool(config, batch_size=job.shard_size, fn_constructor_kwargs={
        "model_ref": model_ref, "device": config.device, "threads": threads, "job": job}))
    with _unwrapped(), _order(encoded.context, preserve=True):
        total = _write_in_order(encoded, job, manifest, done)
    return finish_manifest(job, manifest, total, math.ceil(total / job.shard_size))


def encode_files(job: EncodeJob, model_ref: str, config: RayEncodeConfig | None = None) -> dict[str, Any]:
    """``promcse encode --engine ray``: :func:`promcse.corpus.encode.encode_corpus` on a Ray actor pool, resuming the
    same way (shards already written are skipped); returns the final manifest.

    Uses this process's Ray connection, else ``config.address``, else a new local instance (shut down after).

    Raises:
        PromcseError: Bad rows (file and line named), settings, an empty corpus, or an output of another run.
    """
    config = config or RayEncodeConfig()
    config.check()
    _check_job(job)
    manifest, done = resume_state(job, model_ref, _model_dim(model_ref))
    if manifest["complete"]:
        return manifest
    with _ray_session(config) as ray:
        parts = ray.data.from_items([{"part": i} for i in range(config.workers)], override_num_blocks=config.workers)
        encoded = parts.map_batches(PartEncoder, **_pool(config, batch_size=1, fn_constructor_kwargs={
            "model_ref": model_ref, "device": config.device, "threads": int(config.cpus_per_worker), "job": job,
            "parts": config.workers, "skip": sorted(done), "source": manifest["input"]}))
        with _unwrapped(), _order(encoded.context, preserve=False):
            total = _write_by_shard(encoded, job, manifest)
    return finish_manifest(job, manifest, total, math.ceil(total / job.shard_size))


@contextmanager
def _ray_session(config: RayEncodeConfig) -> Iterator[Any]:
    """``ray`` for the duration: the connection already open, or one started here (and shut down after)."""
    try:
        import ray
    except ImportError:
        raise PromcseError("encoding on Ray needs Ray Data: pip install 'promcse[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
    try:
        needed, there = config.workers * config.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
        if started and config.address is None and needed > there:
            raise PromcseError(f"workers {config.workers} x cpus_per_worker {config.cpus_per_worker:g} needs "
                               f"{needed:g} CPUs; this machine has {there:g}")
        yield ray
    finally:
        if started:
            ray.shutdown()
