"""Memory probes of a server under test (``bench_serve.py --tracemalloc``): the wrapper the server runs under,
SIGUSR1 snapshots (tracemalloc + glibc's mallinfo2) and what they show (traced and heap-free MiB, top growth)."""

from __future__ import annotations

import pickle
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

# Run as ``python -c TRACED serve ...`` (the promcse command line): on SIGUSR1, start tracemalloc (the first time)
# and dump a snapshot and glibc's mallinfo2 into $BENCH_TRACE_DIR/probe-N.pickle (a temporary name, then renamed).
TRACED = r"""
import ctypes, os, pickle, runpy, signal, sys, tracemalloc
where, count = os.environ["BENCH_TRACE_DIR"], [0]
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
def mallinfo():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    fn.restype = MallInfo2
    info = fn()
    return {name: getattr(info, name) for name, _ in MallInfo2._fields_}
def probe(sig, frame):
    if not tracemalloc.is_tracing():
        tracemalloc.start(6)
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    path = os.path.join(where, f"probe-{count[0]}")
    with open(path + ".tmp", "wb") as out:
        pickle.dump({"snapshot": snap, "mallinfo": mallinfo()}, out)
    os.replace(path + ".tmp", path + ".pickle")
    count[0] += 1
signal.signal(signal.SIGUSR1, probe)
sys.argv = ["promcse"] + sys.argv[1:]
runpy.run_module("promcse", run_name="__main__", alter_sys=True)
"""


def probe_server(process: subprocess.Popen, trace_dir: Path, number: int, timeout: float = 60) -> dict[str, Any]:
    """SIGUSR1 the traced server; wait for its ``number``-th probe file and load it."""
    process.send_signal(signal.SIGUSR1)
    path, until = trace_dir / f"probe-{number}.pickle", time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > until:
            raise SystemExit(f"the traced server wrote no {path.name}")
        time.sleep(0.1)
    with open(path, "rb") as src:
        return pickle.load(src)


def probe_numbers(probe: dict[str, Any]) -> tuple[float, float | None]:
    """(traced MiB, glibc heap free MiB) of one probe."""
    traced = sum(stat.size for stat in probe["snapshot"].statistics("filename")) / 2**20
    info = probe["mallinfo"]
    return traced, (info["fordblks"] / 2**20 if info else None)


def top_growth(first: dict[str, Any], last: dict[str, Any], count: int = 8) -> list[str]:
    """Allocation sites (line, with the calling lines) that grew most from ``first`` to ``last``."""
    diff = last["snapshot"].compare_to(first["snapshot"], "traceback")
    lines = []
    for stat in diff[:count]:
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[:4])
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+d} blocks) at {frames}")
    return lines


def add_trace(headline: dict[str, Any], probes: list[dict[str, Any]]) -> None:
    """With two probes or more: traced and glibc-free MiB per probe into ``headline``; print the top growth."""
    if len(probes) > 1:
        numbers = [probe_numbers(p) for p in probes]
        headline["traced_mib"] = [round(t, 2) for t, _ in numbers]  # [0] right after tracing started
        headline["heap_free_mib"] = [round(f, 1) if f is not None else None for _, f in numbers]
        for line in top_growth(probes[0], probes[-1]):
            print(f"growth since warm-up: {line}")
