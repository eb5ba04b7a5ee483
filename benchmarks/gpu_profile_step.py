"""Profile one GPU train step (BERT-base-sized random model, batch 256, prompt mode, sup) in TF32 and bf16.

Prints the top CUDA kernels and CPU ops of each, to explain the step times of gpu_train_step.py.
Usage: python benchmarks/gpu_profile_step.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from gpu_train_step import build_backbone, make_encoder, make_examples, run_config, run_step, tf32


def main() -> None:
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        backbone, tokenizer, words = build_backbone(Path(tmp), smoke=False)
    data = make_examples(words, 4096)["sup"]
    for prec in ("tf32", "bf16"):
        config = run_config("prompt", "nt_xent_eh", 256, 32, "train.device=cuda", f"train.precision={'bf16' if prec == 'bf16' else 'fp32'}")
        encoder = make_encoder(backbone, tokenizer, config, device)
        opt = torch.optim.AdamW(encoder.trainable_parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with tf32(prec == "tf32"):
            for i in range(3):
                run_step(encoder, config, data, np.arange(i * 256, (i + 1) * 256), opt, sched)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(3, 5):
                    run_step(encoder, config, data, np.arange(i * 256, (i + 1) * 256), opt, sched)
                torch.cuda.synchronize()
        print(f"===== {prec}: by CUDA time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(f"===== {prec}: by CPU time")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
