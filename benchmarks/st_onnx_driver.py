"""The driver side of sentence-transformers' ONNX int8 peer (benchmarks/peer_st_onnx.py) for bench_encode.py.

The peer runs in a side virtual environment (``sentence-transformers[onnx]`` cannot be installed beside
this project's pins), as a subprocess started once that answers one line per command (``run``, ``save
PATH``, ``quit``) behind :data:`PEER_MARK`. This module starts it, times one ``run`` per benchmark round
(the peer measures its own wall and CPU time: :class:`Measured`) and never raises into the benchmark: any
failure sets :attr:`StOnnxPeer.reason` and stops further runs.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Measured:
    """A run timed in another process: its own wall and process-CPU seconds (its output stays there)."""

    wall: float
    cpu: float


ST_ONNX = "sentence-transformers onnx int8"
PEER_MARK = "@peer "  # protocol lines of benchmarks/peer_st_onnx.py --serve


class PeerError(RuntimeError):
    """The side-venv peer failed; the message says why."""


class StOnnxPeer:
    """sentence-transformers' ONNX int8 backend in a side venv: ``benchmarks/peer_st_onnx.py --serve`` as a
    subprocess, started once, timed one ``run`` per round. ``reason`` is set (and no more runs are sent) as
    soon as anything fails: it never raises into the benchmark."""

    def __init__(self, python: str, model: Path, texts: list[str], batch_size: int, threads: int, work: Path,
                 root: Path, timeout: float) -> None:
        self.reason: str | None = None
        self.meta: dict[str, Any] = {}
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        texts_file = root / "peer-texts.json"
        texts_file.write_text(json.dumps(texts), encoding="utf-8")
        self.stderr_path = root / "peer-stderr.txt"
        self.stderr = self.stderr_path.open("w")
        self.cmd = [python, str(Path(__file__).with_name("peer_st_onnx.py")), "--model", str(model),
                    "--texts", str(texts_file), "--batch-size", str(batch_size), "--threads", str(threads),
                    "--work", str(work), "--serve"]

    def start(self) -> None:
        """Launch the peer; it exports (once), loads and warms up while the caller goes on."""
        python = self.cmd[0]
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.stderr, text=True, bufsize=1)
        except OSError as err:
            self.reason = f"cannot start {python}: {err}"
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _stderr_tail(self) -> str:
        self.stderr.flush()
        lines = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[-600:]

    def _reply(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise PeerError(f"no answer within {self.timeout:.0f}s (--st-onnx-timeout)") from None
            if line is None:
                code = self.proc.wait(timeout=30) if self.proc is not None else None
                raise PeerError(f"peer exited (rc={code}): {self._stderr_tail()}")
            if line.startswith(PEER_MARK):
                reply = json.loads(line[len(PEER_MARK):])
                if "error" in reply:
                    raise PeerError(str(reply["error"]))
                return dict(reply)

    def _ask(self, command: str) -> dict[str, Any] | None:
        if self.reason is not None or self.proc is None or self.proc.stdin is None:
            return None
        try:
            if command:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            return self._reply()
        except (PeerError, OSError, ValueError, subprocess.TimeoutExpired) as err:
            self.reason = str(err)
            self.close()
            return None

    def ready(self) -> bool:
        """Wait for the peer to have exported (once), loaded, checked and warmed up; False if it failed."""
        reply = self._ask("")
        if reply is not None:
            self.meta = reply
        return self.reason is None

    def run(self) -> Measured:
        """One timed encode of all the texts inside the peer (NaN if it failed)."""
        reply = self._ask("run")
        return Measured(reply["wall"], reply["cpu"]) if reply else Measured(float("nan"), float("nan"))

    def embeddings(self, path: Path) -> np.ndarray | None:
        """The peer's embeddings of its last run (None if it failed)."""
        reply = self._ask(f"save {path}")
        return np.load(path) if reply else None

    def close(self) -> None:
        """Ask the peer to quit; kill it if it does not."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.write("quit\n")
                    self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
