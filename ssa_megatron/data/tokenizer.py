"""One tokenizer interface over SentencePiece ``.model`` files and Hugging Face ``tokenizer.json``.

``build_tokenizer(path)`` picks the kind from the file (a directory holding ``tokenizer.json`` or
``tokenizer.model`` works too). Every tokenizer exposes ``vocab_size``, ``eod`` (end-of-document id,
appended after each document by the preprocessor), ``tokenize(text) -> list[int]``,
``detokenize(ids) -> str``, ``kind``, ``path`` and ``describe()`` (the metadata recorded next to a
preprocessed dataset and checked at training time).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, List, Optional, Sequence

from ssa_megatron.data.corpus import CorpusError

SENTENCEPIECE = "sentencepiece"
HUGGINGFACE = "huggingface"

# Special tokens tried, in order, as the end-of-document token of a Hugging Face tokenizer.
HF_EOD_CANDIDATES = (
    "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]",
)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Common base: subclasses set ``kind``, ``path``, ``vocab_size``, ``eod``."""

    kind: str = ""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._sha256: Optional[str] = None

    vocab_size: int
    eod: Optional[int]

    def tokenize(self, text: str) -> List[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def document_prefix(self) -> List[int]:
        """The tokens this tokenizer's model expects before each text (a beginning-of-text token
        such as Llama's ``<|begin_of_text|>`` or ``<s>``); none by default."""
        return []

    def describe(self) -> dict:
        """Metadata identifying this tokenizer: kind, vocab_size, eod, sha256 (of the file), path."""
        return {
            "kind": self.kind,
            "vocab_size": int(self.vocab_size),
            "eod": None if self.eod is None else int(self.eod),
            "sha256": self.sha256,
            "path": self.path,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class SentencePieceTokenizer(Tokenizer):
    kind = SENTENCEPIECE

    def __init__(self, path: str):
        super().__init__(path)
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with long text
            raise CorpusError(f"cannot load SentencePiece model {path}: {str(e).splitlines()[0]}")
        self.vocab_size = int(self._sp.GetPieceSize())
        eos = int(self._sp.eos_id())
        self.eod = eos if eos >= 0 else None

    def tokenize(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def document_prefix(self) -> List[int]:
        """The BOS id when an HF ``tokenizer_config.json`` beside the model says
        ``add_bos_token`` (Llama 2's tokenizer.model); a model of train_tokenizer.py has none."""
        try:
            with open(os.path.join(os.path.dirname(self.path), "tokenizer_config.json")) as f:
                add_bos = bool(json.load(f).get("add_bos_token"))
        except (OSError, ValueError, AttributeError):
            return []
        bos = int(self._sp.bos_id())
        return [bos] if add_bos and bos >= 0 else []

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # one thread: parallelism comes from the preprocessor's worker processes
        return self._sp.Encode(list(texts), num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer file (``tokenizer.json``), loaded with the ``tokenizers`` package."""

    kind = HUGGINGFACE

    def __init__(self, path: str, eod_token: Optional[str] = None):
        super().__init__(path)
        from tokenizers import Tokenizer as _HFTok

        try:
            self._tok = _HFTok.from_file(self.path)
        except Exception as e:
            raise CorpusError(f"cannot load Hugging Face tokenizer {path}: {str(e).splitlines()[0]}")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = (max(vocab.values()) + 1) if vocab else 0
        self.eod = None
        if eod_token is not None:
            eid = self._tok.token_to_id(eod_token)
            if eid is None:
                raise CorpusError(f"end-of-document token {eod_token!r} is not in {path}; "
                                  f"pass a token of its vocabulary to --eod-token")
            self.eod = int(eid)
        else:
            for cand in HF_EOD_CANDIDATES:
                eid = self._tok.token_to_id(cand)
                if eid is not None:
                    self.eod = int(eid)
                    break
        self.eod_token = None if self.eod is None else self._tok.id_to_token(self.eod)

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def document_prefix(self) -> List[int]:
        """What the tokenizer's post-processor puts before a text (Llama 2 / 3 and Mistral: their
        BOS; Qwen and byte-level BPEs without a template: nothing). Special tokens it appends
        after a text are not taken: the preprocessor appends its own end of document. Raises
        :class:`CorpusError` when no probe text can be encoded (the prefix cannot be told)."""
        special = set(self._tok.get_added_tokens_decoder())
        words = sorted((i, w) for w, i in self._tok.get_vocab(with_added_tokens=False).items()
                       if i not in special)
        probes = ["a", "the", "0"] + [w for _, w in words[:8]]
        for text in probes:
            try:
                plain = self._tok.encode(text, add_special_tokens=False).ids
                full = self._tok.encode(text, add_special_tokens=True).ids
            except Exception:  # e.g. a word-level vocabulary without the word, no unknown token
                continue
            if not plain:
                continue
            for start in range(len(full) - len(plain) + 1):
                if full[start:start + len(plain)] == plain:
                    return full[:start]
        raise CorpusError(f"cannot tell what {self.path} puts before a text (no probe text "
                          "encodes): pass --bos none to begin documents with nothing")

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))


def resolve_tokenizer_path(path: str) -> str:
    """A tokenizer file path; a directory resolves to its tokenizer.json or tokenizer.model."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return p
        raise CorpusError(f"directory {path} holds no tokenizer.json or tokenizer.model; "
                          f"pass the tokenizer file itself")
    if not os.path.exists(path):
        raise CorpusError(f"tokenizer {path} does not exist; pass a SentencePiece .model or a "
                          f"Hugging Face tokenizer.json (tools/train_tokenizer.py makes a .model)")
    return path


def tokenizer_kind(path: str) -> str:
    """Guess the kind of a tokenizer file from its first bytes (JSON → Hugging Face)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return HUGGINGFACE if head.startswith(b"{") else SENTENCEPIECE


def build_tokenizer(path: str, eod_token: Optional[str] = None) -> Tokenizer:
    """Load a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (or a directory with one).

    ``eod_token`` (Hugging Face only) names the end-of-document token; otherwise the first of
    :data:`HF_EOD_CANDIDATES` present is used. SentencePiece uses the model's eos id.
    """
    path = resolve_tokenizer_path(os.fspath(path))
    kind = tokenizer_kind(path)
    if kind == HUGGINGFACE:
        return HFTokenizer(path, eod_token=eod_token)
    if eod_token is not None:
        tok = SentencePieceTokenizer(path)
        pid = tok._sp.PieceToId(eod_token)
        if pid == tok._sp.unk_id() and eod_token != tok._sp.IdToPiece(tok._sp.unk_id()):
            raise CorpusError(f"end-of-document token {eod_token!r} is not in {path}")
        tok.eod = int(pid)
        return tok
    return SentencePieceTokenizer(path)


def describe_file(path: str) -> dict:
    """``build_tokenizer(path).describe()`` without keeping the tokenizer."""
    return build_tokenizer(path).describe()


def tokenizers_differ(a: Optional[dict], b: Optional[dict]) -> bool:
    """Two tokenizer records (kind, sha256) that are surely different tokenizers. Records of
    different kinds are not compared: an HF model ships the same tokenizer as tokenizer.model and
    as tokenizer.json, and its import and its data may each name another of the two."""
    a, b = a or {}, b or {}
    return bool(a.get("sha256") and b.get("sha256") and a.get("kind") == b.get("kind")
                and a["sha256"] != b["sha256"])


__all__ = [
    "Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "build_tokenizer", "file_sha256",
    "resolve_tokenizer_path", "tokenizer_kind", "SENTENCEPIECE", "HUGGINGFACE", "describe_file",
    "tokenizers_differ",
]


if __name__ == "__main__":  # python -m ssa_megatron.data.tokenizer PATH: print describe()
    import sys

    print(json.dumps(build_tokenizer(sys.argv[1]).describe(), indent=2))

