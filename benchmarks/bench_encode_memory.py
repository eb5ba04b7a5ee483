"""Peak RSS of ``promcse encode --output DIR`` at two corpus sizes, default settings (reliability issue, part 4).

Each size runs the real command line in its own process::

    promcse encode --model MODEL --input FILE --output DIR --device cpu --no-progress

(as ``python -m promcse``, with this interpreter) under ``/usr/bin/time -v``, whose "Maximum resident set size" is
the peak RSS of the whole process: Python, torch, the model and the encode. Where ``/usr/bin/time`` is missing
(``apt-get install -y time``) the same number comes from the child's own resource usage (``os.wait4``).

The corpus: N lines cycling through the bundled ``wiki_5k.txt``, each with a counter suffix (`` #i``) so all N
are distinct. Every setting is the default (shard size 100,000 rows, fp32, batch 64), so 20,000 lines fill a
fifth of one shard and 200,000 lines two whole shards. A peak RSS flat in the corpus size gives
``ratio_200k_over_20k`` (the largest size's peak over the smallest's) close to 1; before streaming within the
shard it grew about 5 KB per row (765 MiB at 20k lines, 1,127 MiB at 80k).

Prints a table, then the JSON headline as the last line:
``{"rows": [...], "peak_rss_mib": [...], "ratio_200k_over_20k": x, "seconds": [...]}``.

Usage:
    python benchmarks/bench_encode_memory.py [--sizes 20000,200000] [--model minilm] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT / "src" / "promcse" / "resources" / "data" / "train" / "wiki_5k.txt"
TIME = Path("/usr/bin/time")
MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000,200000",
                        help="comma-separated corpus sizes in lines (default: 20000,200000)")
    parser.add_argument("--model", default="minilm", help="the encode's --model (default: minilm, bundled)")
    parser.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temporary "
                        "directory, removed after)")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes expects comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--sizes needs at least one size of 1 line or more")
    return args


def write_corpus(path: Path, n: int) -> Path:
    """N distinct lines: the wiki sample's lines in a cycle, each with its line number appended."""
    lines = [line.strip() for line in WIKI.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(f"{lines[i % len(lines)]} #{i}\n")
    return path


def encode_command(model: str, corpus: Path, out: Path) -> list[str]:
    """``promcse encode`` over ``corpus`` into ``out`` with every default."""
    return [sys.executable, "-m", "promcse", "encode", "--model", model, "--input", str(corpus),
            "--output", str(out), "--device", "cpu", "--no-progress"]


def run_measured(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` (its output to ``log``); its peak RSS in MiB and wall seconds. Exits if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    timed = TIME.exists()
    began = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        child = subprocess.Popen([str(TIME), "-v", *command] if timed else command, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # the kernel's accounting of the child (what time -v reads)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    output = log.read_text(encoding="utf-8", errors="replace")
    if child.returncode != 0:
        raise SystemExit(f"encode failed (exit {child.returncode}): {' '.join(command)}\n{output[-3000:]}")
    if not timed:
        return usage.ru_maxrss / 1024, seconds
    found = MAX_RSS.search(output)
    if not found:
        raise SystemExit(f"no 'Maximum resident set size' in /usr/bin/time's output:\n{output[-3000:]}")
    return int(found.group(1)) / 1024, seconds


def measure(size: int, model: str, work: Path) -> dict[str, float]:
    """One size: write the corpus, encode it, check the manifest; rows, peak RSS (MiB) and seconds."""
    corpus = write_corpus(work / f"corpus_{size}.txt", size)
    out = work / f"vectors_{size}"
    peak, seconds = run_measured(encode_command(model, corpus, out), work / f"encode_{size}.log")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    if not manifest["complete"] or manifest["total_rows"] != size:
        raise SystemExit(f"the encode of {size} lines is not complete: {manifest['total_rows']} rows")
    return {"rows": size, "peak_rss_mib": round(peak, 1), "seconds": round(seconds, 1)}


def report(results: list[dict[str, float]]) -> dict[str, object]:
    """Print the table; the JSON headline (the ratio: the largest size's peak over the smallest's)."""
    print(f"{'rows':>10} {'peak RSS MiB':>13} {'seconds':>9} {'rows/s':>8}")
    for r in results:
        print(f"{r['rows']:>10,} {r['peak_rss_mib']:>13.1f} {r['seconds']:>9.1f} {r['rows'] / r['seconds']:>8.0f}")
    small = min(results, key=lambda r: r["rows"])
    large = max(results, key=lambda r: r["rows"])
    return {"rows": [r["rows"] for r in results], "peak_rss_mib": [r["peak_rss_mib"] for r in results],
            "ratio_200k_over_20k": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
            "seconds": [r["seconds"] for r in results],
            "ratio_sizes": [small["rows"], large["rows"]], "rss_source": "/usr/bin/time -v" if TIME.exists()
            else "os.wait4 ru_maxrss"}


def main(argv: list[str] | None = None) -> int:
    """Measure every size in a fresh directory and print the table and the JSON headline."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_encode_memory_", dir=args.workdir) as tmp:
        results = [measure(size, args.model, Path(tmp)) for size in args.sizes]
    print(json.dumps(report(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
