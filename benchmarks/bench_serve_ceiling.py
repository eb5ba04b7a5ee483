"""The library-level ceiling of the int8 server over the unbatched torch server at 8-text requests.

No HTTP: the same ``--texts`` distinct STS sentences (the peer benchmark's) encoded (a) by the frozen MiniLM on
PyTorch, 8 texts a forward pass (what ``--batching off`` runs for an 8-text request), and (b) through the server's
ONNX path (:class:`promcse.serving.onnx_rows.OnnxRows`, int8, open-bank graph) over 64-row batches (8 requests of 8
texts) split into runs of ``--sub-batch`` rows as the engine does. Interleaved for ``--rounds`` rounds, 2 threads
each. The ratio is what the server could reach if serving cost nothing. The last line printed is JSON.

Usage: python benchmarks/bench_serve_ceiling.py [--texts 1024] [--rounds 2] [--sub-batch 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve_peers import sts_texts  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sub-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    import promcse
    from promcse.serving.onnx_rows import OnnxRows

    torch.set_num_threads(args.threads)
    texts = sts_texts()[: args.texts]
    encoder, rows = promcse.load("minilm", device="cpu"), OnnxRows("int8", threads=args.threads)

    def torch_8() -> float:
        began = time.perf_counter()
        for start in range(0, len(texts), 8):
            encoder.encode(texts[start : start + 8], batch_size=8)
        return len(texts) / (time.perf_counter() - began)

    def int8_engine() -> float:
        began = time.perf_counter()
        for start in range(0, len(texts), 64):
            chunk = texts[start : start + 64]
            rows.encode(chunk, [encoder] * len(chunk), batch_size=args.sub_batch)
        return len(texts) / (time.perf_counter() - began)

    torch_8(), int8_engine()  # warm-up (and the graph's export, once)
    runs = [(torch_8(), int8_engine()) for _ in range(args.rounds)]
    print(json.dumps({"torch_8_texts_s": [round(a, 1) for a, _ in runs],
                      "int8_engine_texts_s": [round(b, 1) for _, b in runs],
                      "ceiling_ratio": round(sorted(b / a for a, b in runs)[len(runs) // 2], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
