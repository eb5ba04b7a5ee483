"""Train-step time: promcse prompt mode vs sentence-transformers + PEFT prefix tuning + MNRL.

Both train a deep prefix (P = 10) on the same frozen all-MiniLM-L6-v2 (bundled), on the same
batches of the same data (batch 64, max_len 32, mean pooling, tau = 0.05 <-> MNRL scale 20):

* unsup: wiki sentences, positive = the sentence itself (SimCSE-style dropout views);
* sup: SNLI triplets (anchor, entailment, contradiction as hard negative); promcse uses its
  supervised objective NT-Xent + energy hinge (lambda 10), the peer MultipleNegativesRankingLoss.

A step is everything an optimizer step costs: tokenization, forward, loss, backward, AdamW.
Rounds alternate which side runs first; each reported time is the median over all timed steps.
Times are process CPU seconds per thread (``time.process_time``; 1 thread by default), because
this machine's cores are shared and wall time mostly measures the neighbours; wall-time ratios are
reported alongside. Achieved encoder GFLOP/s of our step is compared with a 2048^3 fp32
``torch.mm`` timed the same way in the same run. Last line: ``{"speedup_vs_sentence_transformers": ..., "matmul_fraction": ...}``
(geometric means over unsup and sup).

Usage: python benchmarks/bench_train_step.py [--rounds 3] [--steps 2] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from promcse.encoder.backbone import load_backbone, minilm_path
from promcse.training.config import RunConfig, load_config
from promcse.io.data import TrainExamples, batch_order, batch_views
from promcse.training.distributed import context, shard_rows
from promcse.training.gradcache import length_chunks
from promcse.encoder.model import build_encoder
from promcse.training.config import build_objective
from promcse.training.step import train_step
from promcse.training.train import encoder_spec, load_examples

MODES = {"unsup": ("bundled:wiki_5k.txt", "nt_xent"), "sup": ("bundled:snli_triplets.csv", "nt_xent_eh")}
PROMPT = 10


def our_config(mode: str, args: argparse.Namespace) -> RunConfig:
    """promcse settings matching the peer: MiniLM, prefix P=10, mean pooling, no MLP head."""
    data, loss = MODES[mode]
    return load_config(None, [
        "model.backbone=minilm", f"model.prompt_length={PROMPT}", "model.pooler=avg", "model.head=none",
        f"data.train_file={data}", f"data.max_length={args.max_length}", f"loss.name={loss}",
        f"train.batch_size={args.batch}", "train.device=cpu", "train.lr=1e-2",
    ])


def ours(config: RunConfig, examples: TrainExamples, total: int) -> tuple[Callable[[np.ndarray], None], Any]:
    """A step function for promcse (calls :func:`promcse.training.step.train_step`, as the loop does) and its encoder."""
    backbone, tokenizer = load_backbone(config.model.backbone)
    torch.manual_seed(0)
    encoder = build_encoder(encoder_spec(config.model, backbone), backbone, tokenizer).train()
    opt = torch.optim.AdamW(encoder.trainable_parameters(), lr=config.train.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    objective, dist = build_objective(config.loss), context()

    def step(rows: np.ndarray) -> None:
        views = batch_views(examples, shard_rows(rows, dist))
        train_step(encoder, objective, views, opt, sched, config.train, config.data.max_length, dist)

    return step, encoder


def peer(examples: TrainExamples, max_length: int) -> Callable[[np.ndarray], None]:
    """A step function for sentence-transformers 6.2 + PEFT prefix tuning + MultipleNegativesRankingLoss."""
    from peft import PrefixTuningConfig, get_peft_model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    st = SentenceTransformer(str(minilm_path()), device="cpu")
    st[0].model = get_peft_model(st[0].model, PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=PROMPT))
    st.max_seq_length = max_length
    loss = MultipleNegativesRankingLoss(st, scale=20.0)
    opt = torch.optim.AdamW([p for p in st.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    st.train()

    def step(rows: np.ndarray) -> None:
        features = [st.preprocess(view) for view in batch_views(examples, rows)]
        opt.zero_grad(set_to_none=True)
        loss(features, None).backward()
        opt.step()

    return step


def encoder_flops(encoder: Any, texts: list[str], max_length: int) -> float:
    """FLOPs of one frozen-encoder forward + backward-to-activations over ``texts`` as our step pads them.

    Our step forwards length-sorted groups, each padded to its own longest row
    (:func:`promcse.training.gradcache.length_chunks`). Per layer and group of N rows, T tokens, P prefix
    slots, hidden H, FFN I: linear forward ``2 N T (4 H^2 + 2 H I)``, attention forward
    ``4 N T (T + P) H``. Backward with frozen weights needs no weight-gradient matmuls: one more
    linear pass (input gradients) and two more attention passes.
    """
    cfg = encoder.backbone.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    total = 0.0
    for chunk in length_chunks(encoder.tokenize(texts, max_length)):
        n, t = chunk.inputs["input_ids"].shape
        linear = 2 * n * t * (4 * h * h + 2 * h * inter)
        attention = 4 * n * t * (t + PROMPT) * h
        # layer 0's Q/K/V need no input gradient: the token embeddings of a frozen model take none
        total += layers * (2 * linear + 3 * attention) - 2 * n * t * 3 * h * h
    return total


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    """Median fp32 ``torch.mm`` rate for ``size^3`` in GFLOP/s of process CPU time per thread."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.process_time()
        torch.mm(a, b)
        times.append((time.process_time() - start) / torch.get_num_threads())
    return 2 * size**3 / statistics.median(times) / 1e9


def time_steps(step: Callable[[np.ndarray], None], batches: list[np.ndarray]) -> list[tuple[float, float]]:
    """``(wall seconds, process CPU seconds per thread)`` of each step."""
    out = []
    for rows in batches:
        wall, cpu = time.perf_counter(), time.process_time()
        step(rows)
        out.append((time.perf_counter() - wall, (time.process_time() - cpu) / torch.get_num_threads()))
    return out


def profile_step(step: Callable[[np.ndarray], None], rows: np.ndarray, path: str) -> dict[str, float]:
    """torch.profiler table of one step to ``path``; share of self CPU time in matmul/attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(rows)
    events = prof.key_averages()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(events.table(sort_by="self_cpu_time_total", row_limit=30))
    total = sum(e.self_cpu_time_total for e in events)
    dense = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "mkldnn", "aten::matmul")
    share = sum(e.self_cpu_time_total for e in events if e.key.startswith(dense))
    return {"matmul_share_of_cpu_time": share / total, "profiled_cpu_s": total / 1e6}


def bench_mode(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Median step times (CPU and wall) of both sides and our achieved GFLOP/s for one mode."""
    config = our_config(mode, args)
    examples = load_examples(config.data, build_objective(config.loss), config.train.batch_size)
    per_round = args.steps + 1  # first step of each side each round is a warm-up
    batches = batch_order(len(examples), args.batch, 1, seed=0)[: args.rounds * per_round]
    our_step, encoder = ours(config, examples, len(batches))
    peer_step = peer(examples, args.max_length)
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "peer": []}
    for r in range(args.rounds):
        chunk = batches[r * per_round : (r + 1) * per_round]
        order = [("ours", our_step), ("peer", peer_step)]
        for name, step in order if r % 2 == 0 else order[::-1]:
            times[name] += time_steps(step, chunk)[1:]
    flops = statistics.median(encoder_flops(encoder, [t for v in batch_views(examples, b) for t in v], args.max_length)
                              for b in batches)
    med = {f"{name}_{kind}_s": statistics.median(t[i] for t in times[name])
           for name in times for i, kind in enumerate(("wall", "cpu"))}
    result = {**med, "speedup": med["peer_cpu_s"] / med["ours_cpu_s"], "speedup_wall": med["peer_wall_s"] / med["ours_wall_s"],
              "ours_gflops": flops / med["ours_cpu_s"] / 1e9, "ours_gflop_per_step": flops / 1e9}
    if args.profile:
        result.update(profile_step(our_step, batches[0], f"{args.profile}.{mode}.txt"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (>= 3 for a median)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of one of our steps to FILE.MODE.txt")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 makes process CPU time exact on a shared machine")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    mm = matmul_gflops()
    results = {mode: bench_mode(mode, args) for mode in MODES}
    mm = statistics.median([mm, matmul_gflops()])  # before and after: the machine is shared
    for mode, r in results.items():
        r["matmul_fraction"] = r["ours_gflops"] / mm
        print(f"{mode}: CPU s/step ours {r['ours_cpu_s']:.3f} peer {r['peer_cpu_s']:.3f} -> {r['speedup']:.2f}x "
              f"(wall {r['speedup_wall']:.2f}x); ours {r['ours_gflops']:.1f} GFLOP/s = {r['matmul_fraction']:.0%} "
              f"of mm {mm:.1f} GFLOP/s per thread", file=sys.stderr)
    geo = lambda key: math.exp(statistics.mean(math.log(r[key]) for r in results.values()))  # noqa: E731
    print(json.dumps({"detail": results, "matmul_gflops": mm, "threads": torch.get_num_threads(), "torch": torch.__version__}))
    print(json.dumps({"speedup_vs_sentence_transformers": round(geo("speedup"), 3), "matmul_fraction": round(geo("matmul_fraction"), 3)}))


if __name__ == "__main__":
    main()
