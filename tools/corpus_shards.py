#!/usr/bin/env python
"""Split a preprocessed dataset into compressed shards of bounded size, or put it back together.

    python tools/corpus_shards.py split runs/english_large/english_text_document shards/ [--max-mib 60] [--format xz]
    python tools/corpus_shards.py join shards/ runs/english_large/
"""
import argparse
import sys

from ssa_megatron.data.corpus import CorpusError
from ssa_megatron.data.shards import FORMATS, join_dataset, split_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="PREFIX OUT_DIR: write shards and manifest.json", allow_abbrev=False)
    s.add_argument("prefix", help="dataset prefix (PREFIX.bin, PREFIX.idx, PREFIX.tokenizer.*)")
    s.add_argument("out_dir")
    s.add_argument("--max-mib", type=float, default=60.0, help="largest shard in MiB (default 60)")
    s.add_argument("--format", choices=FORMATS, default="zstd",
                   help="zstd (fast; joining needs the zstandard package) or xz (Python's own lzma: "
                        "nothing to install where the shards are joined; smaller than zstd, "
                        "several times slower to split)")
    s.add_argument("--level", type=int, default=None,
                   help="compression level (default: zstd 10, xz preset 9)")
    j = sub.add_parser("join", help="SHARD_DIR OUT_DIR: check and rebuild the files", allow_abbrev=False)
    j.add_argument("shard_dir")
    j.add_argument("out_dir")
    a = p.parse_args(argv)
    try:
        if a.command == "split":
            m = split_dataset(a.prefix, a.out_dir, max_bytes=int(a.max_mib * (1 << 20)),
                              level=a.level, fmt=a.format)
            shards = [s for e in m["files"] for s in e["shards"]]
            print(f"wrote {len(shards)} shards ({sum(s['bytes'] for s in shards) / 2**20:.1f} MiB, "
                  f"largest {max(s['bytes'] for s in shards) / 2**20:.1f} MiB) and manifest.json to {a.out_dir}")
        else:
            for path in join_dataset(a.shard_dir, a.out_dir):
                print(f"rebuilt {path} (sha256 checked)")
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
