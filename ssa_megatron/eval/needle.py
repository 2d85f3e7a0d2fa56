"""Needle in a haystack, generated locally.

A *haystack* is filler prose made from small word lists (random but deterministic per seed); the
*needle* is one key-value sentence ("The secret number of the <key> is <value>.") put at a
relative depth of the haystack (0 = start, 1 = just before the question), at a sentence boundary;
the prompt ends with the question, phrased so that the answer is the continuation
("... The secret number of the <key> is"). Every sample of one context length has exactly that
many tokens, so samples batch without padding.

The model answers by greedy decoding a few tokens (no KV cache: the whole sequence is re-run per
token); :func:`score_answer` counts a sample as retrieved when the decoded text, stripped, starts
with the value.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

_ADJ = ["quiet", "old", "bright", "narrow", "distant", "heavy", "gentle", "early", "green", "tall",
        "small", "cold", "busy", "empty", "wide", "warm", "plain", "simple", "dark", "open"]
_NOUN = ["river", "market", "village", "teacher", "garden", "road", "farmer", "bridge", "station",
         "window", "library", "harbor", "valley", "council", "engine", "forest", "letter", "school",
         "mountain", "office"]
_VERB = ["watched", "crossed", "followed", "reached", "passed", "visited", "described", "opened",
         "joined", "left", "built", "changed", "found", "kept", "moved", "carried"]
_PREP = ["near", "behind", "beyond", "along", "above", "under", "across", "beside"]
_KEYS = ["copper lantern", "silver compass", "blue violin", "iron kettle", "amber mirror",
         "golden anchor", "marble statue", "wooden clock", "crystal vase", "paper kite",
         "velvet glove", "glass bottle", "stone tablet", "brass whistle", "linen map"]


def filler_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the "
            f"{rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_PREP)} the "
            f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}.")


@dataclass
class NeedleSample:
    tokens: List[int]   # exactly the requested context length
    answer: str         # the value, e.g. "48213"
    key: str
    depth: float
    needle_position: int  # token index where the needle sentence starts


def make_needle_sample(tokenizer, length: int, depth: float, seed: int = 0) -> NeedleSample:
    """One prompt of exactly ``length`` tokens with the needle at relative ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth {depth} must lie in [0, 1]")
    rng = random.Random(f"needle:{seed}:{length}:{depth}")
    key = rng.choice(_KEYS)
    value = str(rng.randint(10000, 99999))
    needle = tokenizer.tokenize(f" The secret number of the {key} is {value}.")
    question = tokenizer.tokenize(f" What is the secret number of the {key}? "
                                  f"The secret number of the {key} is")
    budget = length - len(needle) - len(question)
    if budget < 1:
        raise ValueError(f"context length {length} is too short for a needle sample "
                         f"({len(needle) + len(question) + 1} tokens at least)")
    sentences: List[List[int]] = []
    total = 0
    while total < budget:
        sent = tokenizer.tokenize((" " if sentences else "") + filler_sentence(rng))
        sentences.append(sent)
        total += len(sent)
    filler = [t for s in sentences for t in s][:budget]
    bounds = [0]
    for s in sentences:
        bounds.append(min(budget, bounds[-1] + len(s)))
    at = min(bounds, key=lambda b: abs(b - depth * budget))
    tokens = filler[:at] + needle + filler[at:] + question
    assert len(tokens) == length
    return NeedleSample(tokens, value, key, depth, at)


def make_needle_set(tokenizer, lengths: Sequence[int], depths: Sequence[float],
                    trials: int = 1, seed: int = 0) -> List[NeedleSample]:
    return [make_needle_sample(tokenizer, L, d, seed + i)
            for L in lengths for d in depths for i in range(trials)]


def answer_token_budget(tokenizer, answer: str, extra: int = 2) -> int:
    """Tokens to decode: the answer's own length (with a leading space) plus a little."""
    return len(tokenizer.tokenize(" " + answer)) + extra


def score_answer(generated: str, answer: str) -> float:
    """1.0 when the decoded continuation starts with the answer (whitespace stripped), else 0."""
    return 1.0 if generated.strip().startswith(answer) else 0.0


def greedy_generate(next_token: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                    steps: int) -> torch.Tensor:
    """Append ``steps`` greedy tokens to ``tokens`` [B, L]; ``next_token`` maps [B, t] -> [B]."""
    out = tokens
    new = []
    for _ in range(steps):
        nxt = next_token(out).reshape(-1, 1).to(out.device, out.dtype)
        new.append(nxt)
        out = torch.cat([out, nxt], dim=1)
    return torch.cat(new, dim=1) if new else tokens[:, :0]


def model_next_token(model, vocab_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Greedy next token of a megatron GPTModel (padded vocabulary rows excluded)."""
    device = next(model.parameters()).device

    def step(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)
        pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        with torch.no_grad():
            logits = model(tokens, pos, None)  # [B, t, V]
        return logits[:, -1, :vocab_size].argmax(-1)
    return step


def needle_accuracy(samples: Sequence[NeedleSample], tokenizer,
                    next_token: Callable[[torch.Tensor], torch.Tensor],
                    micro_batch_size: int = 1) -> List[Dict]:
    """Decode each sample greedily; one record per sample (length, depth, answer, text, score)."""
    records = []
    groups: Dict[int, List[NeedleSample]] = {}
    for s in samples:
        groups.setdefault(len(s.tokens), []).append(s)
    for length, group in groups.items():
        for i in range(0, len(group), micro_batch_size):
            chunk = group[i: i + micro_batch_size]
            steps = max(answer_token_budget(tokenizer, s.answer) for s in chunk)
            toks = torch.tensor([s.tokens for s in chunk], dtype=torch.long)
            gen = greedy_generate(next_token, toks, steps).cpu()
            for s, row in zip(chunk, gen.tolist()):
                text = tokenizer.detokenize(row)
                records.append({"length": length, "depth": s.depth, "answer": s.answer,
                                "generated": text, "score": score_answer(text, s.answer)})
    return records
