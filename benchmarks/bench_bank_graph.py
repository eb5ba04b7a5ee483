"""Open-bank ONNX graph vs the per-model ONNX graph, library call: is the prompts-as-inputs graph slower?

Exports the bundled all-MiniLM-L6-v2 twice at int8 — ``promcse.models.onnx_bank.export_bank_graph`` (prompt tables
as inputs; the frozen model feeds an empty, masked one-slot bank) and ``promcse.models.onnx_graph.export_encoders``
(the per-model graph of ``promcse export --format onnx``) — and encodes the same length-sorted STS-B sentences in
batches of ``--batch`` with ``--threads`` ONNX Runtime threads, alternating the two for ``--rounds`` passes each.
The last line printed is JSON: texts/s per pass and the median ratio bank / per-model.

Usage: python benchmarks/bench_bank_graph.py [--texts 2048] [--batch 32] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import promcse
    from promcse.models.onnx_bank import OnnxBankEncoder, bank_arrays, export_bank_graph
    from promcse.models.onnx_graph import export_encoders
    from promcse.models.onnx_runtime import OnnxEncoder

    lines = resources.files("promcse").joinpath("resources", "data", "sts", "test.tsv").read_text().splitlines()[1:]
    texts = sorted([t for line in lines for t in line.split("\t")[:2]][: args.texts], key=len, reverse=True)
    encoder = promcse.load("minilm", device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_bank_graph_"))
    bank = OnnxBankEncoder(export_bank_graph(encoder, tmp / "bank", quantize="int8"), threads=args.threads)
    baked = OnnxEncoder(export_encoders([encoder], ["minilm"], tmp / "baked", quantize="int8"), threads=args.threads)
    row = bank_arrays(encoder)
    chunks = [texts[s : s + args.batch] for s in range(0, len(texts), args.batch)]
    paths = {"bank": lambda chunk: bank.run(chunk, [row], [0] * len(chunk)),
             "per_model": lambda chunk: baked.raw_vectors(chunk, batch_size=len(chunk))}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            began = time.perf_counter()
            for chunk in chunks:
                run(chunk)
            rates[name].append(round(len(texts) / (time.perf_counter() - began), 1))
            print(f"{name:>10}: {rates[name][-1]:8.1f} texts/s", flush=True)
    ratio = statistics.median(rates["bank"]) / statistics.median(rates["per_model"])
    print(json.dumps({"texts": len(texts), "batch": args.batch, "threads": args.threads, "texts_per_s": rates,
                      "bank_over_per_model": round(ratio, 3)}))


if __name__ == "__main__":
    main()
