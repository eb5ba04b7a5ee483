"""Run the experiment table of docs/RESULTS.md: train each row's config per seed, then evaluate.

Resumable: a (row, seed) whose result JSON exists is skipped; a run directory that already holds a
finished checkpoint is evaluated without retraining. Results go to experiments/results/<row>-s<seed>.json.

Usage (from the repository root, with ../shared beside it):
    python experiments/run_table.py [--rows row3,row4] [--seeds 42,43,44] [--runs-dir runs/experiments]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
RESULTS = ROOT / "experiments" / "results"
TEACHER = ROOT / "experiments" / "models" / "all-mpnet-base-v2"  # experiments/fetch_mpnet.sh


def evaluate_model(model: str, data_dir: str, cxc: str) -> dict:
    """7-task STS 'all', CxC plain + bootstrap, alignment/uniformity."""
    import promcse
    from promcse.evaluation.sts import evaluate

    encoder = promcse.load(model, device="cpu")
    return evaluate(lambda t: encoder.encode(t, batch_size=128), "all", data_dir, cxc=cxc)


def model_facts(model: str) -> dict:
    """Trainable parameter count and checkpoint size."""
    import promcse

    encoder = promcse.load(model, device="cpu")
    if encoder.spec.mode == "frozen":
        return {"trainable_params": 0, "checkpoint_bytes": 0, "backbone_params": sum(p.numel() for p in encoder.backbone.parameters())}
    path = Path(model)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json"))
    trainable = sum(p.numel() for m in (encoder.prompt, encoder.head) if m is not None for p in m.parameters())
    if encoder.spec.mode == "full":
        trainable += sum(p.numel() for p in encoder.backbone.parameters())
    return {"trainable_params": trainable, "checkpoint_bytes": size,
            "backbone_params": sum(p.numel() for p in encoder.backbone.parameters())}


def train_row(config: Path, seed: int, out: Path, train_dir: str) -> float:
    """Train one row with `promcse train`; returns wall seconds (0 if it was already trained)."""
    if (out / "config.json").is_file() and (out / "DONE").is_file():
        return float((out / "DONE").read_text() or 0)
    env = {**os.environ, "TRAIN_DIR": train_dir, "MINED_DIR": str(ROOT / "runs" / "experiments" / "data"),
           "TEACHER": str(TEACHER), "DISTILL_CACHE": str(ROOT / "runs" / "experiments" / "teacher_cache")}
    start = time.time()
    cmd = [sys.executable, "-m", "promcse", "train", "--config", str(config), "--set", f"train.seed={seed}",
           "--output", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, env=env)
    seconds = time.time() - start
    (out / "DONE").write_text(f"{seconds:.1f}")
    return seconds


def run_one(row: str, seed: int, args: argparse.Namespace) -> None:
    target = RESULTS / f"{row}-s{seed}.json"
    if target.exists():
        print(f"skip {target.name} (done)")
        return
    if row == "row1_frozen":
        model, seconds = "minilm", 0.0
    elif row == "row0_teacher_mpnet":
        model, seconds = str(TEACHER), 0.0
    else:
        out = Path(args.runs_dir) / f"{row}-s{seed}"
        seconds = train_row(CONFIGS / f"{row}.yaml", seed, out, args.train_dir)
        model = str(out)
    started = time.time()
    result = evaluate_model(model, args.data_dir, args.cxc)
    payload = {"row": row, "seed": seed, "model": model, "train_seconds": round(seconds, 1),
               "eval_seconds": round(time.time() - started, 1), **model_facts(model), **result}
    if model not in ("minilm", str(TEACHER)):
        meta = json.loads((Path(model) / "config.json").read_text())
        payload["best_step"], payload["stsb_dev"] = meta.get("step"), meta.get("stsb_dev")
        payload["curve"] = [json.loads(l) for l in (Path(model) / "metrics.jsonl").read_text().splitlines()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=1))
    print(f"{row} seed {seed}: avg {result['avg']:.2f}  cxc {result['cxc']['spearman']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="row1_frozen," + ",".join(sorted(p.stem for p in CONFIGS.glob("*.yaml"))))
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "experiments"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "eval"))
    parser.add_argument("--train-dir", default=str(ROOT.parent / "shared" / "data" / "train"))
    parser.add_argument("--cxc", default=str(ROOT.parent / "shared" / "data" / "eval" / "cxc" / "sts_val.csv"))
    args = parser.parse_args()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for row in args.rows.split(","):
            try:
                run_one(row, seed if row not in ("row1_frozen", "row0_teacher_mpnet") else 0, args)
            except subprocess.CalledProcessError as err:
                print(f"{row} seed {seed}: training failed ({err.returncode}); rerun to retry", file=sys.stderr)


if __name__ == "__main__":
    main()
