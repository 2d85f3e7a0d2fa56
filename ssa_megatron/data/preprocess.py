"""Raw corpus → megatron-core IndexedDataset (``<prefix>.bin`` / ``<prefix>.idx``) + tokenizer record.

:func:`preprocess` is the whole tool; ``tools/preprocess_data.py`` is its command-line front
(:func:`main`). Documents are read by :mod:`ssa_megatron.data.corpus`, tokenized by worker processes
(huge documents are cut into pieces so they tokenize in parallel with bounded memory), an EOD token
is appended per document and everything is written with megatron-core's ``IndexedDatasetBuilder``
in the dtype ``DType.optimal_dtype(vocab_size)`` picks.

Output is atomic: everything is written under temporary names in the output directory, and only
after all of it is complete are the files renamed, the ``.idx`` last (megatron-core needs both
``.bin`` and ``.idx``; an old ``.idx`` is removed first). An error or interrupt removes the
temporary files and leaves any earlier dataset of the same prefix untouched.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import Counter, deque
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ssa_megatron.data import metadata as _meta
from ssa_megatron.data.corpus import (
    CorpusError, expand_inputs, format_skipped, inputs_fingerprint, iter_documents, probe_join_mode,
    split_long_text,
)
from ssa_megatron.data.tokenizer import Tokenizer, build_tokenizer

# Documents longer than this (characters) are tokenized in pieces (see corpus.split_long_text);
# cuts fall between words, so ids equal whole-document ids; SentencePiece is slower per token on
# long inputs, and the pieces keep each worker's memory flat.
DEFAULT_PIECE_CHARS = 1 << 14
# Text per task sent to a worker.
DEFAULT_BATCH_CHARS = 1 << 18

_WORKER_TOK: Optional[Tokenizer] = None
_WORKER_DTYPE = None


def _init_worker(tok_path: str, eod_token: Optional[str], dtype_name: str, ignore_sigint: bool):
    global _WORKER_TOK, _WORKER_DTYPE
    if ignore_sigint:  # the parent handles Ctrl-C and tears the pool down
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # a forked worker inherits the CLI's SIGTERM -> KeyboardInterrupt handler; the parent's
        # teardown terminates workers, and one that turned that into an exception could block
        # in its own exit (queue locks, a full result pipe) and hang the parent's exit with it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOK = build_tokenizer(tok_path, eod_token=eod_token)
    _WORKER_DTYPE = np.dtype(dtype_name)


def _encode_batch(texts: List[str]) -> List[np.ndarray]:
    ids = _WORKER_TOK.tokenize_batch(texts)
    return [np.asarray(x, dtype=_WORKER_DTYPE) for x in ids]


def _megatron_indexed():
    """megatron-core's DType and IndexedDatasetBuilder (import warnings about TE/apex silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType, IndexedDatasetBuilder


def _noop() -> int:
    return os.getpid()


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, n)


def output_prefixes(output_prefix: str, json_keys: Sequence[str]) -> List[str]:
    """One dataset per json key: ``prefix`` for a single key, ``prefix_<key>`` for several."""
    output_prefix = os.path.abspath(os.fspath(output_prefix))
    if len(json_keys) == 1:
        return [output_prefix]
    return [f"{output_prefix}_{k}" for k in json_keys]


class _Outputs:
    """Temporary output files of one preprocessing run, committed by rename or removed."""

    def __init__(self, prefixes: List[str]):
        self.prefixes = prefixes
        self.tag = f".tmp-{os.getpid()}"
        self.temps: List[str] = []
        self.committed = False

    def tmp(self, final: str) -> str:
        p = final + self.tag
        self.temps.append(p)
        return p

    def check_writable(self) -> None:
        for prefix in self.prefixes:
            d = os.path.dirname(prefix)
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise CorpusError(f"cannot create output directory {d}: {e.strerror or e}; "
                                  f"choose another --output-prefix") from None
            probe = os.path.join(d, f".{os.path.basename(prefix)}.probe{self.tag}")
            try:
                with open(probe, "wb") as f:
                    f.write(b"x")
                os.unlink(probe)
            except OSError as e:
                raise CorpusError(f"output directory {d} is not writable: {e.strerror or e}; "
                                  f"choose another --output-prefix") from None

    def cleanup(self) -> None:
        for p in self.temps:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError:
                pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_tokenizer(tokenizer: Union[str, Tokenizer], eod_token: Optional[str],
                    append_eod: bool) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = build_tokenizer(os.fspath(tokenizer), eod_token=eod_token)
    if append_eod and tok.eod is None:
        raise CorpusError(f"tokenizer {tok.path} has no end-of-document token; pass --eod-token "
                          f"with one of its special tokens (or --no-append-eod)")
    return tok


def _worker_pool(tok: Tokenizer, eod_token: Optional[str], dtype: np.dtype, workers: int):
    """A started ProcessPoolExecutor of tokenizing workers, or None (``workers`` 1: this process
    tokenizes itself)."""
    if workers <= 1:
        _init_worker(tok.path, eod_token, dtype.name, False)
        return None
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker,
        initargs=(tok.path, eod_token, dtype.name, True))
    try:
        # start the workers now, before the progress bar's thread exists
        for f in [executor.submit(_noop) for _ in range(workers)]:
            f.result()
    except BaseException:
        _kill_executor(executor)
        raise
    return executor


class _DocumentSink:
    """Joins the tokenized pieces of each document (after the tokenizer's document prefix, plus
    EOD) and appends it to its key's dataset builder; counts documents and tokens per key and
    updates the progress bar."""

    def __init__(self, builders: list, eod: Optional[np.ndarray], bar, t_work: float,
                 skipped: Counter, prefix: Optional[np.ndarray] = None):
        self.builders = builders
        self.eod = eod
        self.prefix = prefix
        self.bar = bar
        self.t_work = t_work
        self.skipped = skipped
        self.pending_pieces: List[List[np.ndarray]] = [[] for _ in builders]
        self.docs = [0] * len(builders)
        self.tokens = [0] * len(builders)
        self.last_post = time.perf_counter()

    def add(self, meta: List[Tuple[int, bool]], arrays: List[np.ndarray]) -> None:
        done = 0
        for (k, last), arr in zip(meta, arrays):
            self.pending_pieces[k].append(arr)
            if not last:
                continue
            parts = self.pending_pieces[k]
            if self.prefix is not None:
                parts.insert(0, self.prefix)
            if self.eod is not None:
                parts.append(self.eod)
            doc = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self.pending_pieces[k] = []
            self.builders[k].add_document(doc, [int(doc.size)])
            self.docs[k] += 1
            self.tokens[k] += int(doc.size)
            done += 1
        if self.bar is not None and done:
            self.bar.update(done)
            now = time.perf_counter()
            if now - self.last_post > 0.5:
                self.last_post = now
                el = max(now - self.t_work, 1e-9)
                self.bar.set_postfix_str(f"{sum(self.tokens) / el:,.0f} tokens/s, skipped "
                                         f"{sum(self.skipped.values())}", refresh=False)


def _tokenize(documents, sink: _DocumentSink, executor, workers: int, piece_chars: int,
              batch_chars: int, join_mode) -> None:
    """Cut ``documents`` ((key index, text) pairs) into pieces, tokenize them in batches of about
    ``batch_chars`` characters (in ``executor`` when there is one, at most 4 batches per worker in
    flight) and hand the results to ``sink`` in order."""
    inflight: deque = deque()
    max_inflight = 4 * workers
    batch: List[str] = []
    batch_meta: List[Tuple[int, bool]] = []
    batch_size = 0

    def submit() -> None:
        nonlocal batch, batch_meta, batch_size
        if not batch:
            return
        if executor is None:
            sink.add(batch_meta, _encode_batch(batch))
        else:
            inflight.append((batch_meta, executor.submit(_encode_batch, batch)))
            while len(inflight) >= max_inflight:
                m, fut = inflight.popleft()
                sink.add(m, fut.result())
        batch, batch_meta, batch_size = [], [], 0

    for k, text in documents:
        pieces = split_long_text(text, piece_chars, join_mode)
        for i, piece in enumerate(pieces):
            batch.append(piece)
            batch_meta.append((k, i == len(pieces) - 1))
            batch_size += len(piece)
            if batch_size >= batch_chars:
                submit()
    submit()
    while inflight:
        m, fut = inflight.popleft()
        sink.add(m, fut.result())


def _no_documents_error(skipped: Counter, json_keys: List[str], n_files: int) -> CorpusError:
    why = format_skipped(skipped)
    hint = ""
    if skipped.get("missing_key"):
        hint = f"; no document has the field(s) {', '.join(json_keys)}: check --json-keys"
    return CorpusError(f"no documents to write from {n_files} input file(s) (skipped: {why})"
                       f"{hint}")


def _stage_outputs(outputs: _Outputs, builders: list, sink: _DocumentSink, tok: Tokenizer,
                   dtype: np.dtype, *, copy_tokenizer: bool, append_eod: bool, bos_ids: List[int],
                   json_keys: List[str], input_format: str, text_unit: str, files: List[str],
                   fingerprint: str, skipped: Counter):
    """Finalize every dataset under temporary names: its ``.idx``, the tokenizer copy and the
    ``.tokenizer.json`` record. Returns (idx, tokenizer copy or None, record) temp paths per key."""
    staged = []
    desc = tok.describe()
    now_iso = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    from ssa_megatron import __version__

    for k, prefix in enumerate(outputs.prefixes):
        idx_tmp = outputs.tmp(prefix + ".idx")
        builders[k].finalize(idx_tmp)
        copy_name = ctmp = None
        if copy_tokenizer:
            copy_name = _meta.tokenizer_copy_name(prefix, tok.kind)
            ctmp = outputs.tmp(os.path.join(os.path.dirname(prefix), copy_name))
            shutil.copyfile(tok.path, ctmp)
        meta = {
            "format": _meta.FORMAT,
            "version": _meta.VERSION,
            "tokenizer": dict(desc, file=copy_name),
            "dataset": {
                "prefix": os.path.basename(prefix),
                "dtype": dtype.name,
                "documents": sink.docs[k],
                "tokens": sink.tokens[k],
                "append_eod": bool(append_eod),
                "bos": [int(i) for i in bos_ids],
                "json_key": json_keys[k] if any(_is_jsonl(f, input_format) for f in files) else None,
                "input_format": input_format,
                "text_unit": text_unit,
                "inputs": files,
                "inputs_sha256": fingerprint,
                "skipped": dict(sorted(skipped.items())),
            },
            "created": now_iso,
            "tool": f"ssa_megatron {__version__} preprocess",
        }
        mtmp = outputs.tmp(_meta.metadata_path(prefix))
        with open(mtmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        staged.append((idx_tmp, ctmp, mtmp))
    return staged


def refuse_existing_dataset(prefixes: Sequence[str]) -> None:
    """CorpusError naming the first prefix that already holds a dataset (.bin or .idx): what it
    holds, and the flag that replaces it."""
    for prefix in prefixes:
        found = [ext for ext in (".bin", ".idx") if os.path.exists(prefix + ext)]
        if not found:
            continue
        try:
            meta = _meta.read_metadata(prefix)
        except CorpusError:
            meta = None
        d = meta.get("dataset") if isinstance(meta, dict) else None
        held = (f" ({d['documents']:,} document{'s' * (d['documents'] != 1)}, {d['tokens']:,} tokens, "
                f"built {meta.get('created', '?')})"
                if isinstance(d, dict) and isinstance(d.get("documents"), int)
                and isinstance(d.get("tokens"), int) else "")
        raise CorpusError(f"{prefix}{'/'.join(found)} already holds a dataset{held}; pass --overwrite "
                          f"to replace it, or choose another --output-prefix")


def _commit(outputs: _Outputs, staged) -> None:
    """fsync the temporary files, then rename them into place: an old ``.idx`` goes first, the
    new ``.idx`` comes last."""
    for p in outputs.temps:
        if os.path.exists(p):
            _fsync(p)
    for prefix, (idx_tmp, copy_tmp, meta_tmp) in zip(outputs.prefixes, staged):
        if os.path.exists(prefix + ".idx"):
            os.unlink(prefix + ".idx")
        os.replace(prefix + ".bin" + outputs.tag, prefix + ".bin")
        if copy_tmp:
            os.replace(copy_tmp, copy_tmp[: -len(outputs.tag)])
        os.replace(meta_tmp, _meta.metadata_path(prefix))
        os.replace(idx_tmp, prefix + ".idx")
    try:
        _fsync(os.path.dirname(outputs.prefixes[0]))
    except OSError:
        pass
    outputs.committed = True


def preprocess(
    inputs: Union[str, Sequence[str]],
    output_prefix: str,
    tokenizer: Union[str, Tokenizer],
    *,
    json_keys: Sequence[str] = ("text",),
    input_format: str = "auto",
    text_unit: str = "file",
    invalid_utf8: str = "skip",
    append_eod: bool = True,
    eod_token: Optional[str] = None,
    bos: str = "auto",
    workers: Optional[int] = None,
    copy_tokenizer: bool = True,
    piece_chars: int = DEFAULT_PIECE_CHARS,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``inputs`` into megatron-core indexed dataset(s) at ``output_prefix``.

    ``tokenizer`` is a path (SentencePiece ``.model`` / HF ``tokenizer.json``) or a tokenizer from
    :func:`build_tokenizer`. With several ``json_keys`` one dataset per key is written at
    ``<output_prefix>_<key>``. Returns a summary dict: ``prefixes``, ``documents``, ``tokens``
    (EOD included), ``skipped`` (reason → count), ``skipped_total``, ``seconds`` (wall, all of it),
    ``tokenize_seconds`` (reading + tokenizing + writing), ``docs_per_s`` and ``tokens_per_s`` (over
    ``tokenize_seconds``), ``dtype``, ``metadata`` (paths of the ``.tokenizer.json`` files), ``per_key``.
    ``bos`` "auto" begins each document with ``tok.document_prefix()`` (an imported Llama's BOS;
    nothing for this project's own tokenizers), recorded as the metadata's ``dataset.bos``.
    Raises :class:`CorpusError` (one-line message) for user errors; nothing is left on disk then.
    An existing dataset at an output prefix is refused before any work unless ``overwrite``
    (then it is replaced only once the new one is complete).
    """
    t_start = time.perf_counter()
    if bos not in ("auto", "none"):
        raise CorpusError(f"bos={bos!r}: use 'auto' (the tokenizer's own document prefix) or 'none'")
    json_keys = [json_keys] if isinstance(json_keys, str) else list(json_keys)
    tok = _load_tokenizer(tokenizer, eod_token, append_eod)
    files = expand_inputs(inputs)
    if workers is None or workers <= 0:
        workers = default_workers()
    prefixes = output_prefixes(output_prefix, json_keys)
    if not overwrite:
        refuse_existing_dataset(prefixes)
    outputs = _Outputs(prefixes)
    outputs.check_writable()
    # dtype rule of megatron-core (uint16 below 65500 ids, else int32)
    DType, IndexedDatasetBuilder = _megatron_indexed()
    dtype_type = DType.optimal_dtype(tok.vocab_size)  # a numpy scalar type, as megatron wants
    dtype = np.dtype(dtype_type)
    # read everything once up front for the fingerprint (cheap next to tokenization)
    fingerprint = inputs_fingerprint(files)
    prefix_ids = tok.document_prefix() if bos == "auto" else []
    join_mode = probe_join_mode(tok.tokenize)

    skipped: Counter = Counter()
    builders = []
    executor = None
    bar = None
    try:
        for prefix in prefixes:
            builders.append(IndexedDatasetBuilder(outputs.tmp(prefix + ".bin"), dtype=dtype_type))
        eod = np.asarray([tok.eod], dtype=dtype) if append_eod else None
        doc_prefix = np.asarray(prefix_ids, dtype=dtype) if prefix_ids else None
        executor = _worker_pool(tok, eod_token, dtype, workers)

        t_work = time.perf_counter()  # throughput is measured from here (after imports, pool start)
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit=" docs", desc="preprocess", dynamic_ncols=True, mininterval=0.5,
                       file=sys.stderr)
        sink = _DocumentSink(builders, eod, bar, t_work, skipped, doc_prefix)
        documents = iter_documents(files, input_format=input_format, json_keys=json_keys,
                                   text_unit=text_unit, invalid_utf8=invalid_utf8, skipped=skipped)
        _tokenize(documents, sink, executor, workers, piece_chars, batch_chars, join_mode)
        if executor is not None:
            executor.shutdown(wait=True)
            executor = None
        if bar is not None:
            bar.close()
            bar = None

        if sum(sink.docs) == 0:
            raise _no_documents_error(skipped, json_keys, len(files))
        staged = _stage_outputs(outputs, builders, sink, tok, dtype, copy_tokenizer=copy_tokenizer,
                                append_eod=append_eod, bos_ids=prefix_ids, json_keys=json_keys,
                                input_format=input_format, text_unit=text_unit, files=files,
                                fingerprint=fingerprint, skipped=skipped)
        _commit(outputs, staged)
    except BaseException:
        if bar is not None:
            bar.close()
        if executor is not None:
            _kill_executor(executor)
        for b in builders:
            try:
                b.data_file.close()
            except Exception:
                pass
        outputs.cleanup()
        raise

    t_end = time.perf_counter()
    docs, tokens = sink.docs, sink.tokens
    elapsed = t_end - t_start
    work = max(t_end - t_work, 1e-9)
    skipped_total = sum(v for r, v in skipped.items() if r != "invalid_utf8_replaced")
    result = {
        "prefixes": prefixes,
        "prefix": prefixes[0],
        "metadata": [_meta.metadata_path(p) for p in prefixes],
        "documents": sum(docs),
        "tokens": sum(tokens),
        "per_key": {k: {"prefix": p, "documents": d, "tokens": t}
                    for k, p, d, t in zip(json_keys, prefixes, docs, tokens)},
        "skipped": dict(skipped),
        "skipped_total": skipped_total,
        "seconds": elapsed,
        "tokenize_seconds": work,
        "docs_per_s": sum(docs) / work,
        "tokens_per_s": sum(tokens) / work,
        "dtype": dtype.name,
        "tokenizer": tok.describe(),
        "inputs": files,
        "workers": workers,
    }
    if log is not None:
        log(format_summary(result))
    return result


def _is_jsonl(path: str, input_format: str) -> bool:
    from ssa_megatron.data.corpus import detect_format

    return detect_format(path, input_format) == "jsonl"


def _kill_executor(executor) -> None:
    """Stop a ProcessPoolExecutor now (best effort; tasks are short and workers ignore SIGINT)."""
    procs = list((getattr(executor, "_processes", None) or {}).values())
    # the call queue's feeder thread may be stuck writing a batch into a pipe no worker reads any
    # more; without this the interpreter would wait for it forever at exit
    call_queue = getattr(executor, "_call_queue", None)
    if call_queue is not None:
        try:
            call_queue.cancel_join_thread()
        except Exception:
            pass
    try:
        executor.shutdown(wait=False, cancel_futures=True)
    except Exception:
        pass
    for p in procs:
        try:
            p.terminate()
        except Exception:
            pass
    for p in procs:
        try:
            p.join(timeout=5)
            if p.is_alive():  # ignored the terminate: a stuck worker must not hang our exit
                p.kill()
                p.join(timeout=5)
        except Exception:
            pass


def format_summary(r: dict) -> str:
    lines = []
    for key, info in r["per_key"].items():
        p = info["prefix"]
        lines.append(f"wrote {p}.bin, {p}.idx ({r['dtype']}) and {_meta.metadata_path(p)}: "
                     f"{info['documents']:,} documents, {info['tokens']:,} tokens")
    skipped = {k: v for k, v in r["skipped"].items() if v}
    lines.append(
        f"documents {r['documents']:,}  tokens {r['tokens']:,}  skipped {r['skipped_total']:,}"
        + (f" ({format_skipped(Counter(skipped))})" if skipped else "")
        + f"  time {r['seconds']:.1f} s (tokenizing {r['tokenize_seconds']:.1f} s: "
        f"{r['docs_per_s']:,.1f} docs/s, {r['tokens_per_s']:,.0f} tokens/s)"
        + f"  workers {r['workers']}")
    lines.append("train with: --data-path " + " ".join(r["prefixes"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from ssa_megatron.console import make_parser
    p = make_parser(
        description="Tokenize jsonl / text corpora into megatron-core .bin/.idx datasets "
                    "(EOD after each document), with a <prefix>.tokenizer.json record.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files, directories or globs (.jsonl/.json/.ndjson, text; .gz/.bz2/.xz/.zst)")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>.bin, <prefix>.idx, <prefix>.tokenizer.json "
                        "(<prefix>_<key>.* for several --json-keys)")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="SentencePiece .model or Hugging Face tokenizer.json (or a directory with one)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl field(s) to read (default: text)")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: .jsonl/.json/.ndjson are JSON lines, anything else text")
    p.add_argument("--text-unit", choices=["file", "paragraph"], default="file",
                   help="plain text: one document per file, or per blank-line separated paragraph")
    p.add_argument("--invalid-utf8", choices=["skip", "replace", "error"], default="skip",
                   help="documents with invalid UTF-8: skip and count (default), replace bytes, or stop")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token (default: SentencePiece eos; HF <|endoftext|>, </s>, ...)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not append the EOD token after each document")
    p.add_argument("--bos", choices=["auto", "none"], default="auto",
                   help="auto: begin each document with the tokens the tokenizer's model expects "
                        "before a text (an HF tokenizer's post-processor template: Llama's and "
                        "Mistral's BOS; nothing for Qwen or a train_tokenizer.py model); none: never")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all CPUs)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false",
                   help="reference the tokenizer file instead of copying it next to the dataset")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset that already exists at --output-prefix (by default it is "
                        "refused: checkpoints and runs may depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        preprocess(
            args.input, args.output_prefix, args.tokenizer, json_keys=args.json_keys,
            input_format=args.input_format, text_unit=args.text_unit, invalid_utf8=args.invalid_utf8,
            append_eod=args.append_eod, eod_token=args.eod_token, bos=args.bos, workers=args.workers,
            copy_tokenizer=args.copy_tokenizer, progress=not args.quiet, log=print,
            overwrite=args.overwrite)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot read/write{where}: {e.strerror or e}; nothing written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written (temporary files removed)", file=sys.stderr)
        # Leave at once (the temporary files are gone already): a tokenizer worker stopped while
        # sending its result leaves the process pool's manager thread waiting for the rest of
        # that message forever, and a normal interpreter exit joins that thread.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
