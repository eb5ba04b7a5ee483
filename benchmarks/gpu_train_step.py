"""GPU train step of a BERT-base-sized random encoder: fp32 vs TF32 vs bf16 autocast, plain vs GradCache memory.

Speed does not need trained weights: the backbone is ``BertModel(BertConfig())`` (12 layers, hidden
768, 110 M parameters) with random weights, and a word-level tokenizer over 30,522 made-up words
written to a temporary directory, so nothing is downloaded. Sentences are random words (8-40, so
many are truncated at max_len 32). The step timed is :func:`promcse.training.step.train_step` itself
(tokenization, forward, loss, backward, AdamW), prompt mode with P = 16 (the BERT-base recipe).

Measured (medians over ``--steps`` after ``--warmup``; CUDA synchronised around each step):

* step time, unsup (2 views) and sup (3 views, NT-Xent + EH), prompt mode and full fine-tuning,
  in fp32 (TF32 off), TF32 matmuls, and bf16 autocast (``train.precision=bf16``);
* peak ``torch.cuda.max_memory_allocated`` of one step: plain vs GradCache vs GradCache + tiled
  at batch 256, and GradCache + tiled at 1024 and 4096;
* GradCache gradient vs plain back-propagation through the same chunks with dropout ON (checks
  that the CUDA random state replays: backbone attention/hidden dropout and prefix dropout).

Prints one JSON line (the last line). ``--smoke`` runs a tiny model on CPU to check the script.

Usage: python benchmarks/gpu_train_step.py [--batch 256] [--steps 10] [--smoke] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from promcse.training.config import RunConfig, load_config
from promcse.io.data import TrainExamples, batch_views
from promcse.training.distributed import context, shard_rows
from promcse.training.gradcache import chunked_reference_step, grad_cache_step, length_chunks
from promcse.encoder.model import SentenceEncoder, build_encoder
from promcse.training.config import build_objective
from promcse.training.step import train_step
from promcse.training.train import encoder_spec


def build_backbone(directory: Path, smoke: bool) -> tuple[BertModel, BertTokenizerFast, list[str]]:
    """Random BERT (base, or tiny with ``smoke``) and a word-level tokenizer; no download."""
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) if smoke else BertConfig()
    words = [f"w{i}" for i in range(config.vocab_size - 5)]
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=False)
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False), tokenizer, words


def make_examples(words: list[str], rows: int, seed: int = 0) -> dict[str, TrainExamples]:
    """Random sentences: unsup (anchor only) and sup (anchor, positive, hard negative)."""
    rng = random.Random(seed)
    sent = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))  # noqa: E731
    a, p, n = ([sent() for _ in range(rows)] for _ in range(3))
    return {"unsup": TrainExamples(a, None, None, "random"), "sup": TrainExamples(a, p, n, "random")}


def run_config(mode: str, loss: str, batch: int, max_length: int, *extra: str) -> RunConfig:
    """promcse settings for one measurement."""
    prompt = ["model.prompt_length=16"] if mode == "prompt" else ["model.prompt_length=0", "train.lr=3e-5"]
    return load_config(None, [f"model.mode={mode}", *prompt, "model.pooler=cls", "model.head=train_only",
                              f"loss.name={loss}", f"train.batch_size={batch}", f"data.max_length={max_length}", *extra])


def make_encoder(backbone: BertModel, tokenizer: BertTokenizerFast, config: RunConfig, device: torch.device) -> SentenceEncoder:
    """A fresh encoder around a copy of the shared random backbone (full mode trains it)."""
    import copy

    bb = backbone
    if config.model.mode == "full":  # own trainable copy (prompt-mode encoders froze the shared one)
        bb = copy.deepcopy(backbone).requires_grad_(True)
    return build_encoder(encoder_spec(config.model, bb), bb, tokenizer).to(device).train()


def run_step(encoder: SentenceEncoder, config: RunConfig, ex: TrainExamples, rows: np.ndarray,
             opt: torch.optim.Optimizer, sched: Any) -> dict[str, float]:
    """One :func:`promcse.training.step.train_step` on this process's shard of ``rows``, as the training loop calls it."""
    dist = context()
    return train_step(encoder, build_objective(config.loss), batch_views(ex, shard_rows(rows, dist)), opt, sched,
                      config.train, config.data.max_length, dist)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core matmuls on or off for a block (off is PyTorch's default: strict fp32)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(encoder: SentenceEncoder, config: RunConfig, ex: TrainExamples, prec: str, args: argparse.Namespace,
              device: torch.device) -> float:
    """Median seconds per train_step."""
    opt = torch.optim.AdamW(encoder.trainable_parameters(), lr=config.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = config.train.batch_size
    times = []
    for i in range(args.warmup + args.steps):
        rows = np.arange(i * batch, (i + 1) * batch) % len(ex)
        sync(device)
        start = time.perf_counter()
        config.train.precision = "bf16" if prec == "bf16" else "fp32"  # bf16 = promcse's own autocast option
        with tf32(prec == "tf32"):
            run_step(encoder, config, ex, rows, opt, sched)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup:])


def peak_memory(encoder: SentenceEncoder, config: RunConfig, ex: TrainExamples, device: torch.device) -> dict[str, float]:
    """Peak allocated memory (MiB) of one fp32 step, and above the memory held before it."""
    opt = torch.optim.SGD(encoder.trainable_parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rows = np.arange(config.train.batch_size) % len(ex)
    if device.type != "cuda":
        start = time.perf_counter()
        run_step(encoder, config, ex, rows, opt, sched)
        return {"seconds": time.perf_counter() - start}
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_step(encoder, config, ex, rows, opt, sched)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}


def grad_check(encoder: SentenceEncoder, config: RunConfig, ex: TrainExamples, chunk: int) -> float:
    """Relative gradient difference GradCache vs plain backprop through the same chunks, dropout on."""
    views = batch_views(ex, np.arange(config.train.batch_size))
    inputs = encoder.tokenize([t for v in views for t in v], config.data.max_length)
    objective = build_objective(config.loss)
    grads = []
    for step in (chunked_reference_step, grad_cache_step):
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        step(encoder, length_chunks(inputs, max_rows=chunk), objective, len(views[0]))
        grads.append(torch.cat([p.grad.reshape(-1) for p in encoder.trainable_parameters()]))
    return float((grads[1] - grads[0]).norm() / grads[0].norm())


def speed(parts: tuple[BertModel, BertTokenizerFast], data: dict[str, TrainExamples], args: argparse.Namespace,
          device: torch.device) -> dict[str, float]:
    """Step seconds for every (mode, views, precision)."""
    out = {}
    for mode in ("prompt", "full"):
        for views, loss in (("unsup", "nt_xent"), ("sup", "nt_xent_eh")):
            config = run_config(mode, loss, args.batch, args.max_length, f"train.device={device.type}")
            encoder = make_encoder(*parts, config, device)
            for prec in ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16"):
                out[f"{mode}_{views}_{prec}_s"] = time_step(encoder, config, data[views], prec, args, device)
            del encoder
    return out


def memory(parts: tuple[BertModel, BertTokenizerFast], data: dict[str, TrainExamples], args: argparse.Namespace,
           device: torch.device) -> dict[str, Any]:
    """Peak memory of plain / GradCache / GradCache + tiled steps (unsup, prompt mode, fp32)."""
    out: dict[str, Any] = {}
    plans = [("plain", args.batch, ()), ("gradcache", args.batch, (f"train.grad_cache_chunk={args.chunk}",))]
    tiled = (f"train.grad_cache_chunk={args.chunk}", "loss.tile_size=1024")
    plans += [("gradcache_tiled", b, tiled) for b in (args.batch, 4 * args.batch, 16 * args.batch)]
    for name, batch, extra in plans:
        config = run_config("prompt", "nt_xent", batch, args.max_length, f"train.device={device.type}", *extra)
        out[f"{name}_{batch}"] = peak_memory(make_encoder(*parts, config, device), config, data["unsup"], device)
    config = run_config("prompt", "nt_xent_eh", args.batch, args.max_length, "loss.hard_negative_weight=0.5")
    out["grad_rel_err_dropout_on"] = grad_check(make_encoder(*parts, config, device), config, data["sup"], args.chunk)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64, help="GradCache rows per chunk")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, batch 8, 1 step: checks the script")
    parser.add_argument("--json", default="", help="also write the result JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.warmup, args.chunk = 8, 1, 1, 4
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke to check the script on CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        backbone, tokenizer, words = build_backbone(Path(tmp), args.smoke)
        data = make_examples(words, 16 * args.batch)
        result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                  "batch": args.batch, "max_length": args.max_length, "torch": torch.__version__}
        result.update(speed((backbone, tokenizer), data, args, device))
        result["memory"] = memory((backbone, tokenizer), data, args, device)
    result["seconds"] = time.perf_counter() - start
    line = json.dumps(result)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
