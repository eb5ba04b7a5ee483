"""Ship a trained general-purpose prompt as checkpoints/promcse-minilm-general, with its results and a model card
that records the data it saw and their licences.

Refuses unless the run beats the frozen backbone on each of the 7 STS sets and on CxC (the issue's rule).

Usage: python experiments/ship_general.py --row row15_extra_sup --seed 42 [--runs-dir runs/experiments]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
TARGET = ROOT / "checkpoints" / "promcse-minilm-general"
KEEP = ("config.json", "prompt.safetensors", "metrics.jsonl", "run_config.yaml")
# Every training file of row 15, its source and licence (../shared/data/README.md, train/extra/).
DATA = [
    ("SNLI dev+test triplets (5,883)", "SNLI (e-SNLI copy)", "CC BY-SA 4.0"),
    ("twitter_url_train_triplets.csv (11,045)", "castorini/data twitterPPDB (Twitter URL corpus)", "CC BY-NC-SA 3.0"),
    ("argkp2021_triplets.csv (5,341)", "IBM ArgKP-2021", "CDLA-Sharing-1.0"),
    ("pit2015_dev_triplets.csv (1,297)", "cocoxu/twitterparaphrase (PIT-2015 dev)", "none stated"),
    ("xnli_en_dev_triplets.csv (830)", "XNLI English dev (MNLI genres)", "CC BY-NC 4.0"),
]


def beats_frozen(result: dict, frozen: dict) -> list[str]:
    """Names of the STS sets (and CxC) where the run is not above the frozen backbone."""
    worse = [t for t, v in frozen["tasks"].items() if result["tasks"][t]["spearman"] <= v["spearman"]]
    return worse + (["CxC"] if result["cxc"]["spearman"] <= frozen["cxc"]["spearman"] else [])


def licence_section() -> str:
    rows = "\n".join(f"| {name} | {source} | {licence} |" for name, source, licence in DATA)
    return ("\n## Training data and licences\n\nThe prompt was trained (NT-Xent + energy-based hinge, P = 20, one pass) "
            "on these triplet files, each step's batch from one file:\n\n| file (rows) | source | licence |\n|---|---|---|\n"
            f"{rows}\n\nTwo sources are **non-commercial** (CC BY-NC-SA 3.0, CC BY-NC 4.0) and one states no "
            "licence: treat this prompt as for research and non-commercial use. The backbone is all-MiniLM-L6-v2 "
            "(Apache-2.0).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", default="row15_extra_sup")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "experiments"))
    args = parser.parse_args()
    result = json.loads((RESULTS / f"{args.row}-s{args.seed}.json").read_text())
    worse = beats_frozen(result, json.loads((RESULTS / "row1_frozen-s0.json").read_text()))
    if worse:
        raise SystemExit(f"not shipped: not above the frozen backbone on {', '.join(worse)}")
    import promcse
    from promcse.models.canary import write_canaries
    from promcse.models.model_card import write_card

    run = Path(args.runs_dir) / f"{args.row}-s{args.seed}"
    TARGET.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        shutil.copyfile(run / name, TARGET / name)
    write_canaries(promcse.load(str(TARGET), device="cpu"), TARGET)
    slim = {k: v for k, v in result.items() if k != "curve"}
    (TARGET / "results.json").write_text(json.dumps({**slim, "model": "checkpoints/promcse-minilm-general"}, indent=1))
    card = write_card(TARGET, license="other", datasets=["stanfordnlp/snli"])
    card.write_text(card.read_text() + licence_section())
    print(f"shipped {run} -> {TARGET}: avg {result['avg']:.2f}, CxC {result['cxc']['spearman']:.2f}")


if __name__ == "__main__":
    main()
