"""Where distillation moved a student: the spread of in-batch cosines of wiki sentences for the teacher, the
frozen student and trained prompts (the finding behind row9_distill_wiki in docs/RESULTS.md).

For ``--sample`` seeded wiki sentences it prints the mean and std of the off-diagonal cosines of each model's
unit embeddings, and the Pearson correlation of those cosines with the teacher's (how much of the teacher's
relational structure the model shares). The teacher's vectors come from the run's teacher cache (no teacher forward pass here).

Usage: python experiments/distill_geometry.py [--sample 512] [--models minilm,runs/experiments/row9_distill_wiki-s42]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WIKI = "wiki1m_partial/wiki1m_head_11914.txt"


def off_diagonal(vectors: np.ndarray) -> np.ndarray:
    """The cosines of every ordered pair of distinct rows of unit ``vectors``."""
    sims = vectors @ vectors.T
    return sims[~np.eye(len(sims), dtype=bool)]


def main() -> None:
    import promcse
    from promcse.io.data import read_training_file
    from promcse.training.teacher import build_teacher_cache

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-dir", default=str(ROOT.parent / "shared" / "data" / "train"))
    parser.add_argument("--teacher", default=str(ROOT / "experiments" / "models" / "all-mpnet-base-v2"))
    parser.add_argument("--cache", default=str(ROOT / "runs" / "experiments" / "teacher_cache"))
    parser.add_argument("--models", default="minilm,runs/experiments/row9_distill_wiki-s42,"
                                            "runs/experiments/row12_unsup_p20-s42")
    args = parser.parse_args()

    texts = read_training_file(Path(args.train_dir) / WIKI).texts()
    teacher = build_teacher_cache(args.teacher, texts, args.cache, device="cpu")  # the cached vectors
    rng = np.random.default_rng(args.seed)
    sample = [list(teacher.rows)[i] for i in rng.choice(len(teacher.rows), args.sample, replace=False)]
    rows = [("teacher " + Path(args.teacher).name, teacher.views([sample])[0].numpy())]
    for name in args.models.split(","):
        rows.append((name, promcse.load(name, device="cpu").encode(sample, batch_size=128, normalize=True)))
    reference = off_diagonal(rows[0][1])
    for name, vectors in rows:
        cos = off_diagonal(vectors)
        agree = np.corrcoef(cos, reference)[0, 1]
        print(f"{name:45s} in-batch cosine mean {cos.mean():.3f}  std {cos.std():.3f}  r(teacher) {agree:.3f}")


if __name__ == "__main__":
    main()
