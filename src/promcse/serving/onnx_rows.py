"""ONNX Runtime in the server (``promcse serve --backend onnx [--quantize int8]``): the engine's rows through one
open-bank graph per (backbone, pooler) (:mod:`promcse.models.onnx_bank`), the prompt tables fed as inputs.

A prompt loaded or hot-added later is one more row of the next batch's bank: no re-export. The graph of a backbone
is exported once into the ONNX cache (``$PROMCSE_CACHE_DIR/onnx``, keyed by the backbone's files, the pooler, the
quantisation and the library versions) and verified on every load. Rows whose model cannot be in such a graph (an
MLP head at inference, a gated prompt, a full fine-tune) are left to the torch path: :meth:`OnnxRows.encode` says
which.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promcse.encoder.model import SentenceEncoder
from promcse.errors import PromcseError
from promcse.models.onnx_bank import BANK_META, BankRow, OnnxBankEncoder, bank_arrays, export_bank_graph
from promcse.models.onnx_runtime import cache_key, cache_root

ROW_ATTRIBUTE = "_promcse_bank_row"
EXPORT_WAIT_S = 900.0  # how long a process waits for another's export of the same graph


class OnnxRows:
    """Open-bank ONNX graphs for the registry's rows.

    Args:
        quantize: ``none`` (fp32) or ``int8``.
        threads: ONNX Runtime intra-op threads per graph (0: its default), which do not busy-wait between runs
            (the event loop and the engine's tokenisation need those cores).
    """

    def __init__(self, quantize: str = "none", threads: int = 0) -> None:
        if quantize not in ("none", "int8"):
            raise PromcseError(f"unknown quantisation '{quantize}'; choose none or int8", key="quantize")
        self.quantize, self.threads = quantize, threads
        self._graphs: dict[tuple[int, str], OnnxBankEncoder] = {}
        self._lock = threading.Lock()

    @staticmethod
    def row_of(encoder: SentenceEncoder) -> BankRow | None:
        """The encoder's :class:`BankRow`, None when it cannot be in a bank graph. Kept on the encoder object itself,
        so an evicted or replaced prompt takes its table with it."""
        if ROW_ATTRIBUTE not in encoder.__dict__:
            try:
                row: BankRow | None = bank_arrays(encoder)
            except PromcseError:
                row = None
            encoder.__dict__[ROW_ATTRIBUTE] = row
        return encoder.__dict__[ROW_ATTRIBUTE]

    def graph_for(self, encoder: SentenceEncoder) -> OnnxBankEncoder:
        """The open-bank graph of ``encoder``'s backbone and pooler: exported once into the cache, then reused."""
        key = (id(encoder.backbone), encoder.spec.pooler)
        with self._lock:
            if key not in self._graphs:
                self._graphs[key] = self._open(encoder)
            return self._graphs[key]

    def _open(self, encoder: SentenceEncoder) -> OnnxBankEncoder:
        """Open the cached export, exporting it first when missing or damaged. Under a lock file beside the entry:
        server processes starting together (Ray replicas, uvicorn workers) export once, the others wait and open."""
        from filelock import FileLock, Timeout

        entry = cache_root() / ("bank-" + cache_key(encoder.spec.backbone, self.quantize,
                                                    {"pooler": encoder.spec.pooler, "graph": "open-bank"}))
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry.parent / f"{entry.name}.lock"))
        try:
            lock.acquire(timeout=EXPORT_WAIT_S)
        except Timeout:
            raise PromcseError(f"another process has been exporting this graph for {EXPORT_WAIT_S:g} s",
                               path=entry) from None
        try:
            if (entry / BANK_META).is_file():
                try:
                    return OnnxBankEncoder(entry, threads=self.threads, spinning=False)
                except PromcseError:  # a damaged entry is exported again
                    pass
            export_bank_graph(encoder, Path(entry), quantize=self.quantize)
            return OnnxBankEncoder(entry, threads=self.threads, spinning=False)
        finally:
            lock.release()

    def encode(self, texts: Sequence[str], encoders: Sequence[SentenceEncoder],
               batch_size: int = 64) -> dict[int, np.ndarray]:
        """Raw vectors of the rows this backend can run, by row index (the rest are left to the torch path)."""
        groups: dict[tuple[int, str], list[int]] = {}
        rows = [self.row_of(e) for e in encoders]
        for i, (encoder, row) in enumerate(zip(encoders, rows)):
            if row is not None:
                groups.setdefault((id(encoder.backbone), encoder.spec.pooler), []).append(i)
        out: dict[int, np.ndarray] = {}
        for members in groups.values():
            graph = self.graph_for(encoders[members[0]])
            order = sorted(members, key=lambda i: -len(texts[i]))  # similar lengths per run: little padding
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out.update(zip(chunk, self._run(graph, texts, encoders, rows, chunk)))
        return out

    @staticmethod
    def _run(graph: OnnxBankEncoder, texts: Sequence[str], encoders: Sequence[SentenceEncoder],
             rows: Sequence[BankRow | None], chunk: list[int]) -> Any:
        """One graph run over ``chunk``: its distinct prompts stacked once, each row pointing at its own."""
        distinct: dict[int, int] = {}
        for i in chunk:
            distinct.setdefault(id(encoders[i]), len(distinct))
        bank = [None] * len(distinct)
        for i in chunk:
            bank[distinct[id(encoders[i])]] = rows[i]
        return graph.run([texts[i] for i in chunk], bank, [distinct[id(encoders[i])] for i in chunk])
