"""Peak memory of one train step vs batch size: plain vs GradCache vs GradCache + tiled loss.

Real all-MiniLM-L6-v2 (bundled), prompt mode (P = 10), unsupervised wiki sentences (2 views per
row). Every (configuration, batch) runs in a fresh subprocess, so each peak is that process's own:
the peak RSS counter (VmHWM) is reset just before the step (``/proc/self/clear_refs``; falls back
to the lifetime ``ru_maxrss`` where that is not allowed) and read after it. Reported: peak RSS of
the whole process (runtime + weights + step) and the step's increment over the RSS before it.

Gradient check: dropout is switched off in every run (backbone and prefix) so that runs in
different processes are comparable; GradCache and GradCache + tiled must reproduce the plain
step's prompt gradient wherever plain runs, and each other at every size. ``grad_rel_err`` is the
largest ``||g - g_ref|| / ||g_ref||`` seen.

Last line: ``{"peak_ratio_4096_vs_64": ..., "grad_rel_err": ...}`` for GradCache + tiled (the
largest batch run stands in for 4096 when ``--max-batch`` is lower; the detail line names it).

Usage: python benchmarks/bench_memory.py [--max-batch 4096] [--plain-max 1024] [--chunk 64] [--max-length 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS: dict[str, list[str]] = {
    "plain": [],
    "gradcache": ["train.grad_cache_chunk={chunk}"],
    "gradcache_tiled": ["train.grad_cache_chunk={chunk}", "loss.tile_size=512"],
}


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset the peak-RSS counter to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    """One step of one configuration at one batch size; prints a JSON line, saves the gradient."""
    import numpy as np

    from promcse.encoder.backbone import load_backbone
    from promcse.training.config import load_config
    from promcse.io.data import batch_views
    from promcse.training.distributed import context, shard_rows
    from promcse.encoder.model import build_encoder
    from promcse.training.config import build_objective
    from promcse.training.step import train_step
    from promcse.training.train import encoder_spec, load_examples

    overrides = [s.format(chunk=args.chunk) for s in CONFIGS[args.config]]
    config = load_config(None, ["model.backbone=minilm", "model.prompt_length=10", "model.prompt_dropout=0",
                                "data.train_file=bundled:wiki_5k.txt", f"data.max_length={args.max_length}",
                                f"train.batch_size={args.batch}", "train.grad_clip=0", "train.device=cpu", *overrides])
    objective, dist = build_objective(config.loss), context()
    examples = load_examples(config.data, objective, config.train.batch_size)
    backbone, tokenizer = load_backbone("minilm")
    torch.manual_seed(0)
    encoder = build_encoder(encoder_spec(config.model, backbone), backbone, tokenizer).train()
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # comparable gradients across processes (see module docstring)
    opt = torch.optim.SGD(encoder.trainable_parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    views = batch_views(examples, shard_rows(np.arange(args.batch), dist))
    before = rss_kib("VmRSS")
    exact = reset_peak()
    start = time.perf_counter()
    terms = train_step(encoder, objective, views, opt, sched, config.train, config.data.max_length, dist)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(torch.cat([p.grad.reshape(-1) for p in encoder.trainable_parameters()]), args.grad_file)
    print(json.dumps({"config": args.config, "batch": args.batch, "peak_mib": peak / 1024, "before_mib": before / 1024,
                      "step_mib": (peak - before) / 1024, "seconds": seconds, "loss": terms["loss"], "exact_peak": exact}))


def run_child(config: str, batch: int, args: argparse.Namespace, grad_file: Path) -> dict[str, float]:
    """Run :func:`child` in a fresh interpreter; its last stdout line is the result."""
    cmd = [sys.executable, __file__, "--child", "--config", config, "--batch", str(batch), "--chunk", str(args.chunk),
           "--max-length", str(args.max_length), "--grad-file", str(grad_file)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def rel_err(a: Path, b: Path) -> float:
    """``||g_a - g_b|| / ||g_b||`` of two saved gradients."""
    ga, gb = torch.load(a), torch.load(b)
    return float((ga - gb).norm() / gb.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--plain-max", type=int, default=1024, help="largest batch for the plain step (its memory grows fastest)")
    parser.add_argument("--chunk", type=int, default=64, help="GradCache rows per chunk")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--grad-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sizes = [b for b in (64, 256, 1024, 4096) if b <= args.max_batch]
    rows, errors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        grads = lambda c, b: Path(tmp) / f"{c}_{b}.pt"  # noqa: E731
        for batch in sizes:
            for config in CONFIGS:
                if config == "plain" and batch > args.plain_max:
                    continue
                rows.append(run_child(config, batch, args, grads(config, batch)))
                print(json.dumps(rows[-1]), file=sys.stderr)
            ref = "plain" if batch <= args.plain_max else "gradcache"
            for config in CONFIGS:
                if config != ref and (config != "plain"):
                    errors[f"{config}_vs_{ref}_{batch}"] = rel_err(grads(config, batch), grads(ref, batch))
    peak = {(r["config"], r["batch"]): r["peak_mib"] for r in rows}
    top = sizes[-1]
    ratios = {c: peak[(c, top)] / peak[(c, 64)] for c in CONFIGS if (c, top) in peak}
    print(json.dumps({"rows": rows, "grad_rel_err": errors, f"peak_ratio_{top}_vs_64": ratios, "chunk": args.chunk,
                      "max_length": args.max_length, "threads": torch.get_num_threads()}))
    print(json.dumps({f"peak_ratio_{top}_vs_64": round(ratios["gradcache_tiled"], 3), "grad_rel_err": max(errors.values())}))


if __name__ == "__main__":
    main()
