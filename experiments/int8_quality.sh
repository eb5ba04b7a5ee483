#!/usr/bin/env bash
# 7-task STS Avg of the ONNX int8 graph vs the fp32 model, for the frozen MiniLM and both shipped prompts
# ("Fast inference" issue). Writes runs/int8/<name>-{fp32,int8}.json; prints one line per model.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/eval}"
OUT=runs/int8
mkdir -p "$OUT"
for spec in frozen=minilm sup=checkpoints/promcse-minilm-sup-snli unsup=checkpoints/promcse-minilm-unsup-wiki; do
  name=${spec%%=*}; model=${spec#*=}
  [ -d "$OUT/$name-onnx-int8" ] || promcse export --format onnx --model "$model" --quantize int8 --output "$OUT/$name-onnx-int8"
  [ -f "$OUT/$name-int8.json" ] || promcse eval --model "$OUT/$name-onnx-int8" --backend onnx --tasks all \
      --data-dir "$DATA" --json "$OUT/$name-int8.json" --no-progress > /dev/null
  [ -f "$OUT/$name-fp32.json" ] || promcse eval --model "$model" --tasks all --data-dir "$DATA" \
      --json "$OUT/$name-fp32.json" --no-progress > /dev/null
  python - "$OUT/$name-fp32.json" "$OUT/$name-int8.json" "$name" <<'PY'
import json, sys
def avg(path):
    data = json.load(open(path))
    data = data[0] if isinstance(data, list) else data
    data = next(iter(data.values())) if "avg" not in data and len(data) == 1 else data
    return data["avg"]
fp32, int8 = avg(sys.argv[1]), avg(sys.argv[2])
print(f"{sys.argv[3]}: 7-task Avg fp32 {fp32:.2f}  int8 {int8:.2f}  delta {int8 - fp32:+.2f}")
PY
done
