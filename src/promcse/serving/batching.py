"""The serving engine: requests for any prompts batched together into token-bounded forward passes.

Requests (``submit``) enter a queue as jobs of texts, each text counted in tokens. One model thread forms a
batch as soon as work is waiting, lingers up to ``max_wait_ms`` for more, and takes texts under a
``max_batch_tokens`` budget (padded size: rows x longest row), visiting the waiting jobs round-robin so that
a large request cannot hold the model while small ones wait; rows of different prompts share the forward
pass (:meth:`promcse.serving.registry.PromptRegistry.encode_rows`). Results go back through each job's future.

Backpressure: the queue is bounded in tokens (``max_queue_tokens``); a full queue refuses the job at once
(:class:`QueueFull`, answered 503 + Retry-After by the server), never an unbounded backlog. A cancelled job
(timeout, client gone) is dropped before its next text is encoded. ``close`` drains the queue and stops.

Written here because the serving engines that batch across requests (text-embeddings-inference, Infinity)
cannot feed prefix prompts, and Ray Serve's batching splits by model; this one batches across prompts.

Memory: every forward pass has another shape (rows x longest row), so glibc's heap fills with free holes of
every size that it keeps rather than returning to the system; a server's RSS kept rising by tens of MiB per
2,000 requests (issue 15; benchmarks/RESULTS.md). With ``idle_trim`` (the default) the model thread calls
glibc's ``malloc_trim(0)`` when the queue drains, at most every ``TRIM_INTERVAL_S``: the free pages go back to
the system, and RSS measured flat (529 -> 531 MiB over 750 requests, against 587 -> 716 MiB over 1,000 without).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from promcse.io.allocator import malloc_trim
from promcse.errors import PromcseError

if TYPE_CHECKING:
    from promcse.serving.registry import PromptRegistry


SUB_BATCH = 32  # rows per forward pass inside one engine batch (rows of similar length, after sorting)
TRIM_INTERVAL_S = 1.0  # at most one malloc_trim per this many seconds (each costs ~ms, and page faults after)

class QueueFull(Exception):
    """The engine's queue holds ``max_queue_tokens`` already: try again later."""


@dataclass(frozen=True)
class EngineConfig:
    """Batching limits.

    Attributes:
        max_batch_tokens: Padded tokens (rows x longest row) per forward pass.
        max_wait_ms: How long the model thread waits for more work before running a partial batch.
        max_queue_tokens: Tokens waiting in the queue before new jobs are refused.
        max_batch_rows: Rows per forward pass, whatever their length.
        idle_trim: When the queue drains, hand the allocator's free pages back to the system (glibc
            ``malloc_trim``, at most every ``TRIM_INTERVAL_S``; a no-op without glibc). Keeps the server's RSS
            flat under batches of ever-changing shapes (``--idle-trim off`` to disable).
    """

    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_queue_tokens: int = 262_144
    max_batch_rows: int = 256
    idle_trim: bool = True

    def check(self) -> None:
        """Raises PromcseError for limits that could never admit work."""
        for name in ("max_batch_tokens", "max_queue_tokens", "max_batch_rows"):
            if getattr(self, name) < 1:
                raise PromcseError(f"must be at least 1, got {getattr(self, name)}", key=name)
        if not 0 <= self.max_wait_ms <= 10_000:
            raise PromcseError(f"must be in 0..10000, got {self.max_wait_ms}", key="max_wait_ms")


@dataclass
class Job:
    """One request: texts of one model (a registry name, or an encoder it holds: a store prompt), their token
    counts, the future of its (N, D) raw vectors."""

    texts: list[str]
    model: Any
    lengths: list[int]
    future: Future = field(default_factory=Future)
    next_row: int = 0
    result: np.ndarray | None = None
    done_rows: int = 0

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class BatchStats:
    """What the last batches looked like (for metrics)."""

    batches: int = 0
    rows: int = 0
    tokens: int = 0
    last_rows: int = 0
    last_tokens: int = 0
    trims: int = 0
    trim_seconds: float = 0.0


class BatchEngine:
    """Token-budget batching across requests and prompts over one :class:`PromptRegistry`."""

    def __init__(self, registry: PromptRegistry, config: EngineConfig | None = None,
                 on_batch: object | None = None) -> None:
        self.registry, self.config = registry, config or EngineConfig()
        self.config.check()
        self.on_batch = on_batch  # callable(rows, tokens, seconds) for metrics, or None
        self._jobs: deque[Job] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._closing = False
        self.stats = BatchStats()
        self._last_trim = -float("inf")
        self._thread = threading.Thread(target=self._run, name="promcse-batcher", daemon=True)
        self._thread.start()

    @property
    def queued_tokens(self) -> int:
        """Tokens waiting (not yet encoded)."""
        return self._queued_tokens

    @property
    def queued_jobs(self) -> int:
        """Requests waiting or in progress."""
        return len(self._jobs)

    def submit(self, texts: list[str], model: Any) -> Job:
        """Queue ``texts`` for ``model`` (a registry name, or an encoder the job keeps alive until it is done: a
        store prompt evicted or replaced meanwhile still encodes it); the future gets raw float32 vectors (N, D).

        Raises:
            QueueFull: The queue is at ``max_queue_tokens``.
            PromcseError: Unknown model, or the engine is shutting down.
        """
        job = Job(list(texts), model, self.registry.token_counts(texts, model))
        with self._cond:
            if self._closing:
                raise PromcseError("the server is shutting down")
            self._live_jobs()  # a timed-out job's texts leave the queue now, not when the busy model thread looks
            if self._jobs and self._queued_tokens + job.tokens > self.config.max_queue_tokens:
                raise QueueFull(f"queue holds {self._queued_tokens} tokens (limit {self.config.max_queue_tokens})")
            self._jobs.append(job)
            self._queued_tokens += job.tokens
            self._cond.notify()
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued work, then stop the model thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the model thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._encode(batch)
            if self.config.idle_trim:
                self._trim_if_drained()

    def _trim_if_drained(self) -> None:
        """``malloc_trim`` when no rows wait and the last trim is ``TRIM_INTERVAL_S`` old (outside the lock)."""
        now = time.monotonic()
        if now - self._last_trim < TRIM_INTERVAL_S:
            return
        with self._cond:
            if any(j.next_row < len(j.texts) for j in self._jobs):
                return
        self._last_trim = now
        malloc_trim()
        self.stats.trims += 1
        self.stats.trim_seconds += time.monotonic() - now

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """Wait for work, linger ``max_wait_ms`` for more, then take rows under the budgets (round-robin)."""
        with self._cond:
            while not any(j.next_row < len(j.texts) for j in self._live_jobs()):
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
            while not self._closing and self._queued_tokens < self.config.max_batch_tokens:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._take()

    def _live_jobs(self) -> list[Job]:
        """Drop cancelled jobs (their tokens leave the queue); return the rest."""
        for job in [j for j in self._jobs if j.future.cancelled()]:
            self._jobs.remove(job)
            self._queued_tokens -= sum(job.lengths[job.next_row:])
        return list(self._jobs)

    def _take(self) -> list[tuple[Job, int]]:
        """Rows (job, row index) round-robin over live jobs while rows x longest row fits the token budget."""
        taken: list[tuple[Job, int]] = []
        longest, progress = 0, True
        jobs = self._live_jobs()
        while progress and len(taken) < self.config.max_batch_rows:
            progress = False
            for job in jobs:
                if job.next_row >= len(job.texts) or len(taken) >= self.config.max_batch_rows:
                    continue
                length = job.lengths[job.next_row]
                if taken and max(longest, length) * (len(taken) + 1) > self.config.max_batch_tokens:
                    return taken
                taken.append((job, job.next_row))
                longest = max(longest, length)
                job.next_row += 1
                self._queued_tokens -= length
                progress = True
        return taken

    def _encode(self, batch: list[tuple[Job, int]]) -> None:
        """One mixed forward for the batch; deliver finished jobs; a failure fails the jobs it touched."""
        start = time.perf_counter()
        try:
            # Sorted by length inside and forwarded SUB_BATCH rows at a time: one pass over every row of the
            # batch would pad all of them to the longest (measured: 13 % slower than per-request passes).
            vectors = self.registry.encode_rows([j.texts[r] for j, r in batch], [j.model for j, _ in batch],
                                                batch_size=SUB_BATCH)
        except Exception as err:  # noqa: BLE001 - delivered to the requests that asked, not lost in the thread
            for job in {id(j): j for j, _ in batch}.values():
                self._finish(job, err)
            return
        rows, tokens = len(batch), max(j.lengths[r] for j, r in batch) * len(batch)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.tokens += tokens
        self.stats.last_rows, self.stats.last_tokens = rows, tokens
        if callable(self.on_batch):
            self.on_batch(rows, tokens, time.perf_counter() - start)
        for (job, row), vector in zip(batch, vectors):  # one vector per row: models of any dimension mix here
            if job.result is None:
                job.result = np.empty((len(job.texts), vector.shape[0]), dtype=np.float32)
            job.result[row] = vector
            job.done_rows += 1
            if job.done_rows == len(job.texts):
                self._finish(job, None)

    def _finish(self, job: Job, error: Exception | None) -> None:
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                self._queued_tokens -= sum(job.lengths[job.next_row:])
        try:
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(job.result)
        except InvalidStateError:  # cancelled meanwhile (timeout, client gone): nobody is waiting
            pass
