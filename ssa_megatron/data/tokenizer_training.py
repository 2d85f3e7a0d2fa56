"""Train a SentencePiece (BPE or unigram) tokenizer from text / jsonl corpora.

:func:`train_sentencepiece` is the logic, ``tools/train_tokenizer.py`` the front (:func:`main`).
Inputs are read by :mod:`ssa_megatron.data.corpus` (same formats and bad-input handling as the
preprocessor); every non-blank line of every document is one training sentence.

Defaults suit LLM pretraining: ``identity`` normalization with whitespace kept, byte fallback (no
unknown tokens; newlines and rare characters become byte tokens), digits split; ids ``<unk>`` 0,
``<s>`` 1, ``</s>`` 2 (the end-of-document token appended by the preprocessor), then the special
tokens given. With these settings ``detokenize(tokenize(text)) == text``.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import time
from collections import Counter
from typing import Iterator, Optional, Sequence

from ssa_megatron.data.corpus import CorpusError, expand_inputs, format_skipped, iter_documents

MAX_SENTENCE_CHARS = 8192


def _sentences(files, input_format, json_keys, text_unit, skipped: Counter, stats: Counter,
               errors: list) -> Iterator[str]:
    # errors are kept and re-raised after SentencePiece returns (never thrown through its C++)
    try:
        for _, text in iter_documents(files, input_format=input_format, json_keys=json_keys,
                                      text_unit=text_unit, skipped=skipped):
            stats["documents"] += 1
            for line in text.splitlines():
                if not line.strip():
                    continue
                for i in range(0, len(line), MAX_SENTENCE_CHARS):
                    stats["sentences"] += 1
                    yield line[i:i + MAX_SENTENCE_CHARS]
    except BaseException as e:  # noqa: B902 - handed back to the caller
        errors.append(e)


def train_sentencepiece(
    inputs: Sequence[str],
    output_prefix: str,
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = (),
    character_coverage: float = 0.9995,
    normalization: str = "identity",
    split_digits: bool = True,
    json_keys: Sequence[str] = ("text",),
    input_format: str = "auto",
    text_unit: str = "file",
    max_sentences: int = 5_000_000,
    pad: bool = False,
    num_threads: Optional[int] = None,
    verbose: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train and write ``<output_prefix>.model`` and ``<output_prefix>.vocab`` (atomically); an
    existing ``<output_prefix>.model`` is refused before training unless ``overwrite``.

    Returns ``dict(model=, vocab=, vocab_size=, eod=, eod_piece=, model_type=, byte_fallback=,
    special_tokens=, documents=, sentences=, skipped=, seconds=)``. Errors are CorpusError.
    """
    import sentencepiece as spm

    t0 = time.perf_counter()
    if model_type not in ("bpe", "unigram"):
        raise CorpusError(f"--model-type must be bpe or unigram, not {model_type!r}")
    if vocab_size < 8:
        raise CorpusError(f"--vocab-size {vocab_size} is too small")
    files = expand_inputs(inputs)
    output_prefix = os.path.abspath(os.fspath(output_prefix))
    if not overwrite and os.path.exists(output_prefix + ".model"):
        raise CorpusError(f"{output_prefix}.model already exists (datasets and models may have been "
                          f"built with it); pass --overwrite to replace it, or choose another --output-prefix")
    out_dir = os.path.dirname(output_prefix)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None
    reserved = {"<unk>", "<s>", "</s>", "<pad>"}
    special_tokens = list(dict.fromkeys(special_tokens))
    clash = [t for t in special_tokens if t in reserved]
    if clash:
        raise CorpusError(f"special token(s) {', '.join(clash)} are already defined (<unk> 0, <s> 1, </s> 2)")
    skipped: Counter = Counter()
    stats: Counter = Counter()
    model = io.BytesIO()
    errors: list = []
    kwargs = dict(
        sentence_iterator=_sentences(files, input_format, list(json_keys), text_unit, skipped, stats,
                                     errors),
        model_writer=model,
        vocab_size=int(vocab_size),
        model_type=model_type,
        byte_fallback=bool(byte_fallback),
        character_coverage=float(character_coverage),
        normalization_rule_name=normalization,
        remove_extra_whitespaces=(normalization != "identity"),
        split_digits=bool(split_digits),
        allow_whitespace_only_pieces=True,
        user_defined_symbols=special_tokens,
        unk_id=0, bos_id=1, eos_id=2, pad_id=(3 if pad else -1),
        input_sentence_size=int(max_sentences),
        shuffle_input_sentence=True,
        max_sentence_length=MAX_SENTENCE_CHARS * 4,
        num_threads=int(num_threads or os.cpu_count() or 1),
        minloglevel=0 if verbose else 2,
        hard_vocab_limit=True,
    )
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        if errors:
            raise errors[0] from None
        msg = " ".join(str(e).split())
        if stats["sentences"] == 0:
            hint = ""
            if skipped.get("missing_key"):
                hint = f"; no document has the field(s) {', '.join(json_keys)}: check --json-keys"
            raise CorpusError(f"no text to train on in {len(files)} input file(s) "
                              f"(skipped: {format_skipped(skipped)}){hint}") from None
        vocab_error = vocab_size_advice(msg, int(vocab_size))
        if vocab_error:
            raise CorpusError(vocab_error) from None
        raise CorpusError(f"SentencePiece training failed: {msg}") from None
    if errors:
        raise errors[0]
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
    tag = f".tmp-{os.getpid()}"
    temps = [model_path + tag, vocab_path + tag]
    try:
        with open(temps[0], "wb") as f:
            f.write(proto)
        with open(temps[1], "w", encoding="utf-8") as f:
            for i in range(sp.GetPieceSize()):
                f.write(f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n")
        os.replace(temps[1], vocab_path)
        os.replace(temps[0], model_path)
    except BaseException as e:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)
        if isinstance(e, OSError):
            raise CorpusError(f"cannot write {output_prefix}.model: {e.strerror or e}") from None
        raise
    return {
        "model": model_path,
        "vocab": vocab_path,
        "vocab_size": sp.GetPieceSize(),
        "eod": sp.eos_id(),
        "eod_piece": sp.IdToPiece(sp.eos_id()),
        "model_type": model_type,
        "byte_fallback": bool(byte_fallback),
        "special_tokens": {t: sp.PieceToId(t) for t in special_tokens},
        "documents": stats["documents"],
        "sentences": stats["sentences"],
        "skipped": dict(skipped),
        "inputs": files,
        "seconds": time.perf_counter() - t0,
    }


def vocab_size_advice(message: str, vocab_size: int) -> Optional[str]:
    """SentencePiece's vocabulary-size errors as one line that says which way to go."""
    small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if small:
        need = int(small.group(2))
        return (f"--vocab-size {vocab_size} is too small for this text: its characters, bytes and "
                f"special pieces alone need {need}; use --vocab-size {need} or more (or lower "
                "--character-coverage)")
    large = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if large:
        most = int(large.group(2))
        return (f"--vocab-size {vocab_size} is more than this text can fill (at most {most}); use "
                f"--vocab-size {most} or less, or add more text")
    if "Vocabulary size" in message or "vocab_size" in message:
        return f"SentencePiece: {message}"
    return None


def format_result(r: dict) -> str:
    specials = ", ".join(f"{t}={i}" for t, i in r["special_tokens"].items())
    return (f"wrote {r['model']} and {r['vocab']}: {r['model_type']}, vocab {r['vocab_size']}, "
            f"byte fallback {'on' if r['byte_fallback'] else 'off'}, eod {r['eod_piece']}={r['eod']}"
            + (f", special {specials}" if specials else "")
            + f"\ntrained on {r['sentences']:,} lines of {r['documents']:,} documents from "
              f"{len(r['inputs'])} file(s) in {r['seconds']:.1f} s; skipped: {format_skipped(Counter(r['skipped']))}")


def build_parser() -> argparse.ArgumentParser:
    from ssa_megatron.console import make_parser
    p = make_parser(description="Train a SentencePiece BPE/unigram tokenizer from text/jsonl files.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files, directories or globs (.txt, .jsonl; .gz/.bz2/.xz/.zst)")
    p.add_argument("--output-prefix", "--model-prefix", dest="output_prefix", required=True,
                   help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="tokens in the vocabulary (special pieces and bytes included)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece algorithm")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="unknown characters become UTF-8 byte tokens")
    p.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                   help="extra special tokens (user-defined symbols, ids after </s>)")
    p.add_argument("--pad", action="store_true", help="add <pad> with id 3")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of the characters that get their own token (the rarest go to bytes)")
    p.add_argument("--normalization", default="identity",
                   help="SentencePiece normalization rule: identity (keeps text), nfkc, nmt_nfkc")
    p.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True,
                   help="one token per digit")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl field(s) to read")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: jsonl for .jsonl/.json names, text otherwise")
    p.add_argument("--max-sentences", type=int, default=5_000_000,
                   help="sample at most this many lines for training (0: all)")
    p.add_argument("--num-threads", type=int, default=None, help="default: all CPUs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing <prefix>.model (by default it is refused)")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        r = train_sentencepiece(
            a.input, a.output_prefix, vocab_size=a.vocab_size, model_type=a.model_type,
            byte_fallback=a.byte_fallback, special_tokens=a.special_tokens,
            character_coverage=a.character_coverage, normalization=a.normalization,
            split_digits=a.split_digits, json_keys=a.json_keys, input_format=a.input_format,
            max_sentences=a.max_sentences, pad=a.pad, num_threads=a.num_threads, verbose=a.verbose,
            overwrite=a.overwrite)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    print(format_result(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
