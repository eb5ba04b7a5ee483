"""Many prompts in one batch vs one prompt, library call: texts/s and per-batch latency, torch and ONNX (open bank).

A fleet of ``--store`` random prompt tables (P uniform in [10, 20], the scale of a trained prompt's entries) over
the bundled all-MiniLM-L6-v2. The same texts (STS sentences, seeded) are encoded in batches of ``--batch`` rows
twice: every row under ONE prompt (P = 15, the fleet's median), and every batch with ``--distinct`` different
prompts drawn from the store (rows assigned round robin). The paths measured, interleaved for ``--rounds`` rounds
(median kept; these machines are noisy):

- ``torch``: :func:`promcse.encoder.multiprompt.encode_bank` (what the server's engine calls);
- ``onnx`` / ``onnx-int8``: :class:`promcse.models.onnx_bank.OnnxBankEncoder` (prompt tables as graph inputs).

Resident memory per hot prompt is the fleet's table bytes / prompts (float32), and RSS is reported before and after
the fleet is built. The last line printed is the JSON headline.

Usage: python benchmarks/bench_fleet.py [--store 10000] [--distinct 1000] [--batch 1000] [--texts 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def fleet_tables(store: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """``store`` random float32 prompt tables, P uniform in [10, 20], std 0.5 (a trained MiniLM prompt's scale)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.5, size=(int(rng.integers(10, 21)), width)).astype(np.float32) for _ in range(store)]


def sts_texts(count: int) -> list[str]:
    """``count`` sentences of the bundled STS-B test file (both columns, in file order, repeated if needed)."""
    from importlib import resources

    lines = resources.files("promcse").joinpath("resources", "data", "sts", "test.tsv").read_text(encoding="utf-8")
    texts = [text for line in lines.splitlines()[1:] for text in line.split("\t")[:2] if text.strip()]
    return [texts[i % len(texts)] for i in range(count)]


def batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def run_torch(encoder, rows, texts: list[str], batch: int, assign) -> float:  # noqa: ANN001
    """Seconds to encode ``texts`` through encode_bank with the rows' prompts as one bank per batch."""
    import torch

    from promcse.encoder.multiprompt import PromptBank, encode_bank
    from promcse.models.onnx_bank import stack_bank

    start = time.perf_counter()
    for chunk in batches(texts, batch):
        chosen, ids = assign(len(chunk))
        table, lengths, shifts = stack_bank([rows[k] for k in chosen], rows[0].table.shape[1])
        bank = PromptBank((encoder,) * len(chosen), torch.from_numpy(table), torch.from_numpy(lengths),
                          torch.from_numpy(shifts), None)
        encode_bank(bank, chunk, ids, batch_size=batch)
    return time.perf_counter() - start


def run_onnx(graph, rows, texts: list[str], batch: int, assign) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for chunk in batches(texts, batch):
        chosen, ids = assign(len(chunk))
        graph.run(chunk, [rows[k] for k in chosen], ids)
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=int, default=10000)
    parser.add_argument("--distinct", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", default="torch,onnx,onnx-int8")
    return parser.parse_args()


def time_paths(args: argparse.Namespace, encoder, rows: list, single, texts: list[str],  # noqa: ANN001
               graphs: dict) -> dict[str, list[float]]:
    """Seconds per (path, one|many), ``args.rounds`` interleaved rounds."""
    rng = np.random.default_rng(2)

    def one(n: int):  # noqa: ANN202
        return [0], [0] * n

    def many(n: int):  # noqa: ANN202
        chosen = rng.choice(len(rows), size=min(args.distinct, n), replace=False).tolist()
        return chosen, [k % len(chosen) for k in range(n)]

    paths = args.paths.split(",")
    times: dict[str, list[float]] = {f"{p}:{m}": [] for p in paths for m in ("one", "many")}
    for _ in range(args.rounds):
        for path in paths:
            for mode, assign, source in (("one", one, [single]), ("many", many, rows)):
                if path == "torch":
                    seconds = run_torch(encoder, source, texts, args.batch, assign)
                else:
                    seconds = run_onnx(graphs[path], source, texts, args.batch, assign)
                times[f"{path}:{mode}"].append(seconds)
    return times


def main() -> None:
    args = parse_args()
    import psutil
    import torch

    import promcse
    from promcse.models.onnx_bank import BankRow, OnnxBankEncoder, export_bank_graph

    torch.manual_seed(0)
    encoder = promcse.load("minilm", device="cpu")
    width = encoder.spec.shape.num_layers * 2 * encoder.spec.shape.hidden_size
    rss0 = psutil.Process().memory_info().rss
    rows = [BankRow(t, 0) for t in fleet_tables(args.store, width)]
    rss1 = psutil.Process().memory_info().rss
    single = BankRow(np.random.default_rng(1).normal(0, 0.5, size=(15, width)).astype(np.float32), 0)
    texts, paths = sts_texts(args.texts), args.paths.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {p: OnnxBankEncoder(export_bank_graph(encoder, Path(tmp) / p, "int8" if p.endswith("int8") else "none"))
                  for p in paths if p.startswith("onnx")}
        times = time_paths(args, encoder, rows, single, texts, graphs)
    rate = {k: round(args.texts / statistics.median(v), 1) for k, v in times.items()}
    headline = {"texts": args.texts, "batch": args.batch, "store": args.store, "distinct_per_batch": args.distinct,
                "texts_per_s": rate,
                "many_over_one": {p: round(rate[f"{p}:many"] / rate[f"{p}:one"], 3) for p in paths},
                "onnx_int8_over_torch_one": round(rate["onnx-int8:one"] / rate["torch:one"], 3)
                if {"torch", "onnx-int8"} <= set(paths) else None,
                "table_mib_per_prompt": round(sum(r.table.nbytes for r in rows) / len(rows) / 2**20, 3),
                "rss_growth_mib_for_store": round((rss1 - rss0) / 2**20, 1)}
    for key, value in rate.items():
        print(f"{key:>16}: {value:8.1f} texts/s")
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
