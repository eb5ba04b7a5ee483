#!/usr/bin/env bash
# Derived training data for the "Quality" rows of docs/RESULTS.md, written to runs/experiments/data/ (ignored):
# hard negatives mined by the frozen all-MiniLM-L6-v2 among the SNLI dev+test sentences.
# Usage: experiments/prepare_data.sh [TRAIN_DIR]   (default ../shared/data/train)
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_DIR="${1:-../shared/data/train}"
OUT=runs/experiments/data
mkdir -p "$OUT"
SNLI="$TRAIN_DIR/snli_devtest/snli_devtest_for_simcse.csv"
[ -f "$OUT/snli_mined.csv" ] || promcse mine --model minilm --input "$SNLI" --output "$OUT/snli_mined.csv" \
  --range 3-30 --margin 0.1 --per-anchor 1 --no-progress
[ -f "$OUT/snli_mined_k3.csv" ] || promcse mine --model minilm --input "$SNLI" --output "$OUT/snli_mined_k3.csv" \
  --range 3-30 --margin 0.1 --per-anchor 3 --no-progress
# Mined negatives *beside* the SNLI contradictions (row 11): the rows that got a mined negative keep their
# contradiction as hard_neg_1 and take the mined one as hard_neg_2; the rows the margin filter left without one
# keep their contradiction alone, in a second file (the two are sources of one run: each batch is one file's).
[ -f "$OUT/snli_contra_mined.csv" ] || python - "$SNLI" "$OUT" <<'PY'
import csv, sys
from pathlib import Path
snli, out = sys.argv[1], Path(sys.argv[2])
with open(out / "snli_mined.csv", encoding="utf-8", newline="") as f:
    mined = {(r["sent0"], r["sent1"]): r["hard_neg"] for r in csv.DictReader(f)}
with open(snli, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
both = [(r["sent0"], r["sent1"], r["hard_neg"], mined[(r["sent0"], r["sent1"])]) for r in rows if (r["sent0"], r["sent1"]) in mined]
alone = [(r["sent0"], r["sent1"], r["hard_neg"]) for r in rows if (r["sent0"], r["sent1"]) not in mined]
for name, header, data in [("snli_contra_mined.csv", ("sent0", "sent1", "hard_neg_1", "hard_neg_2"), both),
                           ("snli_contra_only.csv", ("sent0", "sent1", "hard_neg"), alone)]:
    with open(out / name, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(data)
    print(f"{name}: {len(data)} rows")
PY

# Issue "general prompt" (rows 15-17): a seeded sub-sample of train/extra/'s 324k unlabeled sentences, 6,000 from
# each file (24,000 in all: a full pass over 324k would take ~5 hours on the 2-core box), shuffled together.
[ -f "$OUT/extra_unlabeled_24k.txt" ] || python - "$TRAIN_DIR/extra" "$OUT/extra_unlabeled_24k.txt" <<'PY'
import random, sys
from pathlib import Path
extra, out = Path(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(42)
lines = []
for name in sorted(extra.glob("unlabeled_*.txt")):
    pool = [l.strip() for l in name.read_text(encoding="utf-8").splitlines() if len(l.split()) >= 4]
    lines += rng.sample(pool, 6000)
rng.shuffle(lines)
out.write_text("\n".join(lines) + "\n", encoding="utf-8")
PY
