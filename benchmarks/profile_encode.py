"""Where the fp32 PyTorch encode spends its time, next to sentence-transformers on the same texts.

Two views of one encode of the same texts (a seeded sample of the STS test sentences, as in
benchmarks/bench_encode.py), batch size and threads:

1. **Stages** of ``promcse.encoder.encode.encode_texts``, timed by running its own pieces in order (tokenize all
   texts once, sort by token count, pad each batch, forward, normalise and copy back), and the same split for
   sentence-transformers' ``encode`` (which tokenizes per batch after sorting by character length). It also
   reports the padding of each (padded token slots / real tokens) and the tokens per second of the forward.
2. **Operators**: ``torch.profiler`` over the forward passes of both, grouped by what the time goes to
   (matrix multiplies, attention, layer norm, GELU, copies/reshapes, the rest), as a share of forward time
   and in milliseconds per 1,000 real tokens. Equal work per token means the remaining gap is padding and
   the stages around the forward, not the kernels.

Usage:
    python benchmarks/profile_encode.py [--sample 2000] [--batch-size 64] [--threads 1] [--data-dir DIR]

The last line printed is the JSON headline.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from bench_encode import default_data_dir, sts_sentences

# operator name fragments -> group (first match wins); the rest is "other"
GROUPS: tuple[tuple[str, str], ...] = (
    ("addmm", "matmul"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"), ("aten::matmul", "matmul"),
    ("aten::linear", "matmul"), ("scaled_dot_product", "attention"), ("softmax", "attention"),
    ("layer_norm", "layer_norm"), ("gelu", "gelu"), ("copy_", "copies"), ("contiguous", "copies"),
    ("aten::cat", "copies"), ("clone", "copies"), ("view", "copies"), ("transpose", "copies"),
    ("permute", "copies"), ("reshape", "copies"), ("embedding", "embedding"),
)


def group_of(name: str) -> str:
    return next((group for fragment, group in GROUPS if fragment in name), "other")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def promcse_stages(encoder: Any, texts: list[str], bs: int) -> tuple[dict[str, float], list[dict[str, torch.Tensor]],
                                                                       np.ndarray]:
    """Seconds per stage of ``encode_texts`` (its own functions, in its order), the padded batches, the vectors."""
    from promcse.encoder.encode import pad_batch, token_length_order, tokenize_all

    stages: dict[str, float] = defaultdict(float)
    tokens, stages["tokenize"] = timed(lambda: tokenize_all(encoder, texts, None))
    order, stages["sort"] = timed(lambda: token_length_order(tokens))
    result = torch.empty(len(texts), encoder.dim)
    batches = []
    encoder.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), bs):
            rows = order[start:start + bs]
            batch, seconds = timed(lambda: pad_batch(encoder, tokens, rows))
            stages["pad"] += seconds
            vectors, seconds = timed(lambda: encoder(batch).float())
            stages["forward"] += seconds
            start_copy = time.perf_counter()
            result[torch.as_tensor(rows)] = torch.nn.functional.normalize(vectors, dim=-1).cpu()
            stages["normalize+copy"] += time.perf_counter() - start_copy
            batches.append(batch)
    return dict(stages), batches, result.numpy()


def st_stages(model: Any, texts: list[str], bs: int) -> tuple[dict[str, float], list[dict[str, torch.Tensor]],
                                                              np.ndarray]:
    """The same split for sentence-transformers: its length sort, per-batch tokenize, forward (modules), copy."""
    stages: dict[str, float] = defaultdict(float)
    order, stages["sort"] = timed(lambda: np.argsort([-len(t) for t in texts], kind="stable"))
    result = np.empty((len(texts), model.get_sentence_embedding_dimension()), dtype=np.float32)
    batches = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), bs):
            rows = order[start:start + bs]
            features, seconds = timed(lambda: model.tokenize([texts[i] for i in rows]))
            stages["tokenize"] += seconds
            out, seconds = timed(lambda: model(features)["sentence_embedding"])
            stages["forward"] += seconds
            start_copy = time.perf_counter()
            result[rows] = out.cpu().numpy()
            stages["normalize+copy"] += time.perf_counter() - start_copy
            batches.append(features)
    return dict(stages), batches, result


def padding(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(real tokens, padded slots) over the batches."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(int(b["attention_mask"].numel()) for b in batches)
    return real, slots


def operator_profile(forward: Callable[[dict[str, torch.Tensor]], Any],
                     batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Self CPU milliseconds per operator group over ``forward`` on every batch."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            forward(batch)
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        groups[group_of(event.key)] += event.self_cpu_time_total / 1000.0
    return dict(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with tsv/original/<TASK>/*.tsv")
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="minilm", help="promcse model (a shipped prompt, e.g. sup-snli, works)")
    parser.add_argument("--repeats", type=int, default=3, help="stage timings: median of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    import promcse
    from promcse.encoder.backbone import minilm_path

    texts = sts_sentences(args.data_dir or default_data_dir())
    texts = random.Random(0).sample(texts, min(args.sample, len(texts)))
    ours = promcse.load(args.model, device="cpu")
    peer = SentenceTransformer(str(minilm_path()), device="cpu")
    ours.encode(texts[:256]), peer.encode(texts[:256])  # warm-up
    runs = {"promcse": [promcse_stages(ours, texts, args.batch_size) for _ in range(args.repeats)],
            "sentence-transformers": [st_stages(peer, texts, args.batch_size) for _ in range(args.repeats)]}
    forwards = {"promcse": lambda b: ours(b), "sentence-transformers": lambda b: peer(dict(b))}
    headline: dict[str, Any] = {"texts": len(texts), "batch_size": args.batch_size, "threads": args.threads,
                                "model": args.model}
    vectors = {}
    for name, results in runs.items():
        stages = {k: float(np.median([r[0][k] for r in results])) for k in results[0][0]}
        _, batches, vectors[name] = results[0]
        real, slots = padding(batches)
        ops = operator_profile(forwards[name], batches)
        forward_ms = sum(ops.values())
        headline[name] = {
            "seconds": round(sum(stages.values()), 3), "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "real_tokens": real, "padded_slots": slots, "padding": round(slots / real - 1, 4),
            "forward_real_tokens_per_s": round(real / stages["forward"], 1),
            "forward_slots_per_s": round(slots / stages["forward"], 1),
            "ops_share": {k: round(v / forward_ms, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
            "ops_ms_per_1k_slots": {k: round(1000 * v / slots, 2) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
        }
        print(f"{name:<22} {len(texts) / headline[name]['seconds']:7.1f} texts/s; stages (s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
              + f"; padding {100 * headline[name]['padding']:.1f}%; forward {headline[name]['forward_slots_per_s']:.0f} "
              f"token slots/s")
        print("   operators (share of forward): " + ", ".join(f"{k} {v:.1%}" for k, v in headline[name]["ops_share"].items()))
    headline["speedup"] = round(headline["sentence-transformers"]["seconds"] / headline["promcse"]["seconds"], 3)
    headline["max_abs_diff"] = float(np.abs(vectors["promcse"] - vectors["sentence-transformers"]).max())
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
