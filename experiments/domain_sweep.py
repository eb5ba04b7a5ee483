"""Dev-only sweep behind the query-prompt defaults (docs/RESULTS.md, "Domain retrieval", "Choosing the recipe").

Each argument after the dataset is a JSON object of QueryTuneConfig fields (defaults: patience 4, 15 epochs); the
run trains on the train split and prints the best dev nDCG@10 (SciFact: 20 % of train carved off; NFCorpus: dev),
the epoch, and the dev score of the untrained prompt (epoch 0). Test is never read.

    python experiments/domain_sweep.py scifact '{"lr": 0.02, "temperature": 0.02, "prompt_length": 20}'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from promcse.training.adapt import AdaptSetup, adapt_labelled
from promcse.training.query_side import QueryTuneConfig

DATA = Path(os.environ.get("PROMCSE_RETRIEVAL_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" /
                           "retrieval"))


def main(argv: list[str]) -> int:
    dataset, dev = argv[0], None if argv[0] == "scifact" else "dev"
    for spec in argv[1:]:
        config = QueryTuneConfig(**{"patience": 4, "epochs": 15, **json.loads(spec)})
        _, result = adapt_labelled(DATA / dataset, None, "train", dev, 0.2, config, AdaptSetup(show_progress=False))
        print(dataset, spec, "best", round(result.best_dev or 0.0, 2), "epoch", result.best_epoch, "start",
              round(result.history[0][1], 2), "s", round(result.seconds), "loss", [round(x, 3) for x in
                                                                          result.train_loss], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
