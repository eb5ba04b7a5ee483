"""Resident memory of 1 vs 8 prompts over one shared all-MiniLM-L6-v2 backbone (and 8 unshared, for contrast).

Writes 8 random prompt checkpoints (P=16, the unsupervised BERT recipe's length) on the bundled ``minilm``
to a temporary directory, then measures each scenario in a fresh subprocess: RSS (psutil) after loading
the models and encoding a few sentences with every one of them. The last line printed is the JSON headline.

Usage:
    python benchmarks/bench_prompts_memory.py [--prompts 8] [--length 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SENTENCES = ["A man is playing a guitar.", "Two dogs run along the beach.", "The committee approved the budget."]


def write_prompts(root: Path, count: int, length: int) -> list[str]:
    """``count`` prompt checkpoints with random prompts on ``minilm``."""
    import torch

    from promcse.encoder.backbone import load_backbone, shape_of
    from promcse.models.checkpoint import save_checkpoint
    from promcse.encoder.model import EncoderSpec, build_encoder
    from promcse.encoder.prompt import PromptSpec

    backbone, tokenizer = load_backbone("minilm")
    shape = shape_of(backbone.config)
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        spec = EncoderSpec("minilm", shape, mode="prompt", prompt=PromptSpec.for_backbone(shape, length), pooler="avg")
        paths.append(str(save_checkpoint(build_encoder(spec, backbone, tokenizer), root / f"prompt{i}")))
    return paths


def measure(scenario: str, paths: list[str]) -> dict[str, float]:
    """Run in a fresh process: load per ``scenario``, encode with every model, report RSS in MiB."""
    import psutil
    import torch

    import promcse
    from promcse.serving.registry import load_many

    torch.set_num_threads(1)
    process = psutil.Process()
    before = process.memory_info().rss
    if scenario == "unshared":
        encoders = [promcse.load(p, device="cpu") for p in paths]
        for encoder in encoders:
            encoder.encode(SENTENCES)
        distinct = len({id(e.backbone) for e in encoders})
    else:
        registry = load_many({f"p{i}": p for i, p in enumerate(paths)}, device="cpu")
        for name in registry.names:
            registry.encode(SENTENCES, model=name)
        distinct = len(registry.backbones)
    gc.collect()
    after = process.memory_info().rss
    return {"rss_mib": after / 2**20, "models_mib": (after - before) / 2**20, "backbones": distinct}


def run_scenario(scenario: str, paths: list[str]) -> dict[str, float]:
    """Measure a scenario in a subprocess (so that earlier scenarios' memory does not count)."""
    argv = [sys.executable, __file__, "--measure", scenario, "--paths", json.dumps(paths)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Write the prompts, measure the scenarios, print a table and the JSON headline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, json.loads(args.paths))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_prompts(Path(tmp), args.prompts, args.length)
        one = run_scenario("shared", paths[:1])
        many = run_scenario("shared", paths)
        unshared = run_scenario("unshared", paths)
    for label, result in (("1 prompt", one), (f"{args.prompts} prompts, shared backbone", many),
                          (f"{args.prompts} prompts, one backbone each", unshared)):
        print(f"{label:<36} RSS {result['rss_mib']:7.1f} MiB  (models {result['models_mib']:6.1f} MiB, "
              f"{result['backbones']} backbone object(s))")
    print(json.dumps({
        "rss_1_prompt_mib": round(one["rss_mib"], 1), f"rss_{args.prompts}_prompts_mib": round(many["rss_mib"], 1),
        "extra_mib_per_prompt": round((many["rss_mib"] - one["rss_mib"]) / max(1, args.prompts - 1), 2),
        f"rss_{args.prompts}_unshared_mib": round(unshared["rss_mib"], 1), "prompt_length": args.length,
    }))


if __name__ == "__main__":
    main()
