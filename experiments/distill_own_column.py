"""How much of the teacher's in-batch similarity mass sits on each anchor's own column, and the KL with and
without those columns (the finding behind ``same_text_columns`` in promcse.objectives.losses).

One seeded batch of SNLI triplets (anchor, positive, hard negative), frozen MiniLM as the student and
all-mpnet-base-v2 (experiments/fetch_mpnet.sh) as the teacher, anchors against all 3B views.

Usage: python experiments/distill_own_column.py [--batch 64] [--train-dir ../shared/data/train]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import promcse
    from promcse.io.data import read_training_file
    from promcse.objectives.losses import distill_similarity, same_text_columns

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-dir", default=str(ROOT.parent / "shared" / "data" / "train"))
    parser.add_argument("--teacher", default=str(ROOT / "experiments" / "models" / "all-mpnet-base-v2"))
    args = parser.parse_args()
    examples = read_training_file(Path(args.train_dir) / "snli_devtest" / "snli_devtest_for_simcse.csv",
                                  require_hard_negatives=True)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)  # the permutation depends only on the length: the same batch as before
    views = [[column[i] for i in order[: args.batch]] for column in (examples.anchor, examples.positive,
                                                                       examples.negatives[0])]
    student, teacher = promcse.load("minilm", device="cpu"), promcse.load(args.teacher, device="cpu")
    s = [torch.tensor(student.encode(v)) for v in views]
    t = [torch.tensor(teacher.encode(v)) for v in views]
    s_cols, t_cols = torch.cat(s), torch.cat(t)
    own = same_text_columns(t[0], t_cols)
    for tau in (0.05, 0.1):
        mass = F.softmax(t[0] @ t_cols.T / tau, dim=1)[own].sum() / args.batch
        kept = distill_similarity(s[0], s_cols, t[0], t_cols, tau).item()
        left_out = distill_similarity(s[0], s_cols, t[0], t_cols, tau, exclude=own).item()
        print(f"tau {tau}: teacher mass on own columns {mass:.3f}; KL with them {kept:.4f}, without {left_out:.4f}")


if __name__ == "__main__":
    main()
