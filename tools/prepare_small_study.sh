#!/usr/bin/env bash
# The corpus of the quality issue's small setting (gpu_validation.sh compare-small): a seeded
# sample of whole documents of the large corpus (tools/prepare_english_corpus.sh --large), big
# enough that the setting's 600 x 4 x 4096 training tokens are each seen once, tokenized with the
# large corpus's own tokenizer; with SHARD_DIR also split into xz shards to carry to a GPU node.
#   bash tools/prepare_small_study.sh LARGE_DIR OUT_DIR [SHARD_DIR]
# CHARS (default 44000000) and SEED (default 17) pick the sample; run again after an interruption.
set -euo pipefail
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LARGE="${1:?usage: $0 LARGE_DIR OUT_DIR [SHARD_DIR]}"
OUT="${2:?usage: $0 LARGE_DIR OUT_DIR [SHARD_DIR]}"
SHARDS="${3:-}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
for f in english_large.jsonl english_spm.model; do
  [ -f "$LARGE/$f" ] || { echo "error: no $LARGE/$f: build the large corpus first with bash tools/prepare_english_corpus.sh --large $LARGE" >&2; exit 1; }
done
mkdir -p "$OUT"
if [ ! -f "$OUT/english_text_document.idx" ]; then
  if [ -f "$OUT/english_sample.jsonl" ]; then
    echo "$OUT/english_sample.jsonl exists: keeping the sample (move it away to draw another CHARS / SEED)"
  else
    "$PY" "$ROOT/tools/sample_corpus.py" --input "$LARGE/english_large.jsonl" \
      --output "$OUT/english_sample.jsonl" --chars "${CHARS:-44000000}" --seed "${SEED:-17}"
  fi
  OVERWRITE=(); [ -e "$OUT/english_text_document.bin" ] && OVERWRITE=(--overwrite)  # a .bin without .idx was cut short
  "$PY" "$ROOT/tools/preprocess_data.py" --input "$OUT/english_sample.jsonl" --tokenizer "$LARGE/english_spm.model" \
    --output-prefix "$OUT/english_text_document" --workers 2 ${OVERWRITE[@]+"${OVERWRITE[@]}"}
else
  echo "$OUT/english_text_document.idx exists: keeping it (move $OUT away to rebuild)"
fi
if [ -n "$SHARDS" ]; then
  if [ -f "$SHARDS/manifest.json" ]; then
    echo "$SHARDS/manifest.json exists: keeping the shards"
  else
    "$PY" "$ROOT/tools/corpus_shards.py" split "$OUT/english_text_document" "$SHARDS" --format xz
  fi
fi
