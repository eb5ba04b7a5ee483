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
