#!/usr/bin/env python
"""Draw a reproducible sample of whole documents from a jsonl corpus, up to a character budget.

    python tools/sample_corpus.py --input runs/english_large/english_large.jsonl \
        --output runs/english_sample/english_sample.jsonl --chars 44000000 --seed 17
"""
import argparse
import sys

from ssa_megatron.data.corpus import CorpusError
from ssa_megatron.data.sample import sample_jsonl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--input", required=True, help="jsonl corpus (one document per line)")
    p.add_argument("--output", required=True, help="jsonl to write")
    p.add_argument("--chars", type=float, required=True,
                   help="stop at the first document that brings the sample to this many characters")
    p.add_argument("--seed", type=int, default=17, help="the shuffle's seed (default 17)")
    p.add_argument("--key", default="text", help="the JSON field holding the text (default text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    a = p.parse_args(argv)
    try:
        r = sample_jsonl(a.input, a.output, int(a.chars), a.seed, key=a.key, overwrite=a.overwrite)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}: {r['documents']:,} of {r['of_documents']:,} documents, "
          f"{r['chars']:,} characters (seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
