"""A reproducible sample of a jsonl corpus: whole documents drawn in a seeded random order until a
character budget is reached, for a study that must fit a smaller carry (one GPU call) while
seeing every token once."""
from __future__ import annotations

import json
import os
import random

from ssa_megatron.data.corpus import CorpusError


def sample_jsonl(src: str, dst: str, max_chars: int, seed: int, key: str = "text",
                 overwrite: bool = False) -> dict:
    """Write to ``dst`` the documents of ``src`` (one JSON object per line) in the order of a
    ``random.Random(seed)`` shuffle, stopping at the first document that brings the ``key`` text
    to ``max_chars`` or more. Returns ``documents``, ``chars`` and ``of_documents`` (all of
    ``src``). The same arguments give the same file; ``dst`` is written whole or not at all."""
    if max_chars <= 0:
        raise CorpusError(f"--chars {max_chars}: give a positive number of characters")
    if os.path.exists(dst) and not overwrite:
        raise CorpusError(f"{dst} exists; pass --overwrite to replace it, or another --output")
    try:
        with open(src, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"cannot read {src}: {err}") from None
    random.Random(seed).shuffle(lines)
    taken, chars = [], 0
    for number, line in enumerate(lines):
        try:
            text = json.loads(line)[key]
        except (ValueError, KeyError, TypeError):
            raise CorpusError(f"{src}: a line without a JSON string field {key!r} "
                              f"(the {number + 1}th of the shuffled order); pass --key") from None
        taken.append(line)
        chars += len(text)
        if chars >= max_chars:
            break
    tmp = f"{dst}.partial-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(taken) + "\n")
        os.replace(tmp, dst)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CorpusError(f"cannot write {dst}: {err}; give an --output in a writable folder") from None
    return {"documents": len(taken), "chars": chars, "of_documents": len(lines)}
