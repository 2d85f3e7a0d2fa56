"""Reading raw corpora: jsonl (``--json-keys`` fields) and plain text, optionally compressed.

Inputs are files, directories (searched recursively for known extensions) or glob patterns.
Formats by extension: ``.jsonl .json .ndjson`` are JSON lines, everything else plain text; ``.gz``,
``.bz2``, ``.xz`` and ``.zst`` (needs the ``zstandard`` package) are decompressed on the fly.
Plain text is one document per file (``text_unit="file"``) or per blank-line separated paragraph
(``text_unit="paragraph"``).

Bad input never crashes the readers: each bad item is skipped and counted in a
:class:`collections.Counter` under one of :data:`SKIP_REASONS`. What the user must fix (a missing
input, an unreadable compressed file, zstd without ``zstandard``) raises :class:`CorpusError`, whose
message is one line naming the problem and the fix.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from collections import Counter
from typing import IO, Iterator, List, Optional, Sequence, Tuple

from ssa_megatron.errors import ConfigError


class CorpusError(ConfigError):
    """A problem the user can fix (bad path, bad option, unusable data). The message is one line."""


SKIP_REASONS = {
    "empty_file": "input files with no content",
    "empty_document": "documents with no text (empty or whitespace only)",
    "invalid_utf8": "documents with invalid UTF-8 bytes (skipped; --invalid-utf8 replace keeps them)",
    "invalid_utf8_replaced": "documents whose invalid UTF-8 bytes were replaced by U+FFFD (kept)",
    "bad_json": "lines that are not a JSON object",
    "missing_key": "JSON documents without the --json-keys field",
    "non_string": "JSON documents whose --json-keys field is not a string",
}

JSONL_EXTS = (".jsonl", ".json", ".ndjson")
TEXT_EXTS = (".txt", ".text", ".md")
COMPRESSED_EXTS = (".gz", ".bz2", ".xz", ".zst")
INVALID_UTF8_POLICIES = ("skip", "replace", "error")


def _strip_compression(path: str) -> Tuple[str, Optional[str]]:
    low = path.lower()
    for ext in COMPRESSED_EXTS:
        if low.endswith(ext):
            return path[: -len(ext)], ext
    return path, None


def _known_extension(path: str) -> bool:
    base, _ = _strip_compression(path)
    return base.lower().endswith(JSONL_EXTS + TEXT_EXTS)


def expand_inputs(paths: Sequence[str], flag: str = "--input") -> List[str]:
    """Files named by ``paths`` (files, directories, globs), in order, without duplicates;
    ``flag`` is the command-line flag that gave them (for the error message).

    Directories contribute their files with known extensions (text, jsonl, compressed variants),
    sorted, recursively, skipping hidden names. A path that matches nothing raises CorpusError.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[str] = []
    seen = set()

    def add(p: str) -> None:
        ap = os.path.abspath(p)
        if ap not in seen:
            seen.add(ap)
            out.append(ap)

    if not paths:
        raise CorpusError("no input given; pass one or more files or directories with --input")
    for p in paths:
        p = os.fspath(p)
        if os.path.isfile(p):
            add(p)
        elif os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if not f.startswith(".") and _known_extension(f):
                        found.append(os.path.join(root, f))
            if not found:
                raise CorpusError(f"input directory {p} holds no .txt/.jsonl files (or .gz/.zst of them)")
            for f in sorted(found):
                add(f)
        elif any(c in p for c in "*?["):
            matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise CorpusError(f"input pattern {p} matches no file")
            for m in matches:
                add(m)
        elif os.path.exists(p):
            raise CorpusError(f"input {p} is neither a regular file nor a directory")
        else:
            raise CorpusError(f"input {p} does not exist; check the path given to {flag}")
    return out


def detect_format(path: str, input_format: str = "auto") -> str:
    """``"jsonl"`` or ``"text"`` for one input file."""
    if input_format in ("jsonl", "text"):
        return input_format
    if input_format != "auto":
        raise CorpusError(f"unknown input format {input_format!r}; use auto, jsonl or text")
    base, _ = _strip_compression(path)
    return "jsonl" if base.lower().endswith(JSONL_EXTS) else "text"


def open_binary(path: str) -> IO[bytes]:
    """Open ``path`` for binary reading, decompressing .gz/.bz2/.xz/.zst transparently."""
    _, ext = _strip_compression(path)
    if ext == ".gz":
        return gzip.open(path, "rb")
    if ext == ".bz2":
        return bz2.open(path, "rb")
    if ext == ".xz":
        return lzma.open(path, "rb")
    if ext == ".zst":
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"{path} is zstd-compressed and the zstandard package is missing; "
                              f"pip install zstandard (or decompress it with unzstd)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True),
                                 buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _read_error(path: str, e: BaseException) -> CorpusError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CorpusError(f"cannot read {path}: {msg} (is the file truncated or corrupt?)")


def _decode(raw: bytes, policy: str, where: str, skipped: Counter) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if policy == "replace":
            skipped["invalid_utf8_replaced"] += 1
            return raw.decode("utf-8", errors="replace")
        if policy == "error":
            raise CorpusError(f"invalid UTF-8 in {where} at byte {e.start}; fix the file or pass "
                              f"--invalid-utf8 skip|replace") from None
        skipped["invalid_utf8"] += 1
        return None


def _check_encodable(text: str, policy: str, where: str, skipped: Counter) -> Optional[str]:
    """JSON may smuggle lone surrogates (``"\\ud800"``) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _decode(text.encode("utf-8", errors="surrogatepass"), policy, where, skipped)


def iter_documents(
    paths: Sequence[str],
    *,
    input_format: str = "auto",
    json_keys: Sequence[str] = ("text",),
    text_unit: str = "file",
    invalid_utf8: str = "skip",
    skipped: Optional[Counter] = None,
) -> Iterator[Tuple[int, str]]:
    """Yield ``(key_index, text)`` for every usable document of the (already expanded) input files.

    ``key_index`` is the position in ``json_keys`` the text came from (0 for plain text). Bad items
    are counted in ``skipped`` (a Counter you pass in) and not yielded.
    """
    if skipped is None:
        skipped = Counter()
    if invalid_utf8 not in INVALID_UTF8_POLICIES:
        raise CorpusError(f"--invalid-utf8 must be one of {', '.join(INVALID_UTF8_POLICIES)}")
    if text_unit not in ("file", "paragraph"):
        raise CorpusError(f"text unit must be 'file' or 'paragraph', not {text_unit!r}")
    json_keys = list(json_keys)
    if not json_keys:
        raise CorpusError("--json-keys needs at least one key")
    for path in paths:
        fmt = detect_format(path, input_format)
        if fmt == "text" and len(json_keys) > 1:
            raise CorpusError(f"{path} is plain text but several --json-keys were given; "
                              f"pass jsonl inputs or a single key")
        try:
            with open_binary(path) as f:
                if fmt == "jsonl":
                    yield from _iter_jsonl(f, path, json_keys, invalid_utf8, skipped)
                elif text_unit == "file":
                    yield from _iter_text_file(f, path, invalid_utf8, skipped)
                else:
                    yield from _iter_paragraphs(f, path, invalid_utf8, skipped)
        except CorpusError:
            raise
        except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
            raise _read_error(path, e) from None
        except Exception as e:  # zstandard.ZstdError and friends
            if type(e).__module__.startswith("zstandard"):
                raise _read_error(path, e) from None
            raise


def _iter_jsonl(f, path, json_keys, policy, skipped) -> Iterator[Tuple[int, str]]:
    any_line = False
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        any_line = True
        where = f"{path}:{lineno}"
        line = _decode(raw, policy, where, skipped)
        if line is None:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            skipped["bad_json"] += 1
            continue
        if not isinstance(obj, dict):
            skipped["bad_json"] += 1
            continue
        for k, key in enumerate(json_keys):
            if key not in obj or obj[key] is None:
                skipped["missing_key"] += 1
                continue
            text = obj[key]
            if not isinstance(text, str):
                skipped["non_string"] += 1
                continue
            text = _check_encodable(text, policy, where, skipped)
            if text is None:
                continue
            if not text.strip():
                skipped["empty_document"] += 1
                continue
            yield k, text
    if not any_line:
        skipped["empty_file"] += 1


def _iter_text_file(f, path, policy, skipped) -> Iterator[Tuple[int, str]]:
    raw = f.read()
    if not raw:
        skipped["empty_file"] += 1
        return
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = _decode(raw, policy, path, skipped)
    if text is None:
        return
    if not text.strip():
        skipped["empty_document"] += 1
        return
    yield 0, text


def _iter_paragraphs(f, path, policy, skipped) -> Iterator[Tuple[int, str]]:
    buf: List[bytes] = []
    start = 1
    any_bytes = False

    def emit():
        raw = b"".join(buf).rstrip(b"\r\n")
        return _decode(raw, policy, f"{path}:{start}", skipped)

    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        any_bytes = any_bytes or bool(raw)
        if raw.strip():
            if not buf:
                start = lineno
            buf.append(raw)
        elif buf:
            text = emit()
            buf = []
            if text is not None:
                yield 0, text
    if buf:
        text = emit()
        if text is not None:
            yield 0, text
    if not any_bytes:
        skipped["empty_file"] += 1


def split_long_text(text: str, max_chars: int, join_mode: str = "keep_space") -> List[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` whose tokens concatenate correctly.

    The preprocessor tokenizes huge documents piecewise (in parallel, with bounded memory). Cuts go
    at a single space between two words, which is a token boundary for whitespace-splitting
    tokenizers, so the concatenated ids equal the whole-text ids. ``join_mode`` says how the
    tokenizer wants the space (see :func:`probe_join_mode`): ``"keep_space"`` starts the next piece
    with it (byte-level BPE), ``"drop_space"`` drops it because the tokenizer adds its own word
    marker at the start of every text (SentencePiece's dummy prefix). Text without such a space in
    the window is cut after a line break, else hard (tokens may then differ at that cut).
    """
    if len(text) <= max_chars:
        return [text]
    pieces = []
    start, n = 0, len(text)
    lo_frac = max_chars // 2
    while n - start > max_chars:
        end = start + max_chars
        nxt = None
        i = text.rfind(" ", start + lo_frac, end) if join_mode != "newline" else -1
        while i > start + lo_frac:
            if not text[i - 1].isspace() and i + 1 < n and not text[i + 1].isspace():
                break
            i = text.rfind(" ", start + lo_frac, i)
        if i > start + lo_frac:
            cut, nxt = i, (i + 1 if join_mode == "drop_space" else i)
        else:
            j = text.rfind("\n", start + lo_frac, end)
            cut = end if j < 0 else j + 1
            nxt = cut
        pieces.append(text[start:cut])
        start = nxt
    pieces.append(text[start:])
    return pieces


def probe_join_mode(tokenize) -> str:
    """How pieces of one text must be cut so their token ids concatenate to the whole text's ids.

    Tries ``tokenize("a b") == tokenize("a") + tokenize(" b")`` (``"keep_space"``) and
    ``== tokenize("a") + tokenize("b")`` (``"drop_space"``) on a few word pairs; ``"newline"`` if
    neither holds (cuts then fall on line breaks and may change tokens there).
    """
    pairs = [("the", "house"), ("of", "the"), ("United", "States"), ("and", "a")]
    for mode, second in (("keep_space", lambda w: " " + w), ("drop_space", lambda w: w)):
        if all(list(tokenize(a + " " + b)) == list(tokenize(a)) + list(tokenize(second(b)))
               for a, b in pairs):
            return mode
    return "newline"


def inputs_fingerprint(files: Sequence[str]) -> str:
    """sha256 over the base names and contents of ``files`` (order-sensitive)."""
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.basename(path).encode("utf-8", "surrogatepass") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def format_skipped(skipped: Counter) -> str:
    items = [f"{k} {v}" for k, v in sorted(skipped.items()) if v]
    return ", ".join(items) if items else "none"


__all__ = [
    "CorpusError", "SKIP_REASONS", "expand_inputs", "detect_format", "open_binary", "iter_documents",
    "split_long_text", "probe_join_mode", "inputs_fingerprint", "format_skipped",
]
