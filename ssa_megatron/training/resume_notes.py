"""One-line notes for a run that continues a checkpoint under other settings or data: what
changed, so that a requeued job or a rerun with other flags does not switch silently. (The
branch-mixing flags have their own note beside the recipe: ``ssa_recipe.recipe_change_note``.)"""
from __future__ import annotations

import json
import os
from typing import Optional

from ssa_megatron.data.tokenizer import tokenizers_differ

# the trainer's flags that set the optimisation schedule and what is trained on
SCHEDULE_ARGS = ("train_iters", "lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_warmup_fraction",
                 "weight_decay", "clip_grad", "global_batch_size", "seq_length", "data_path", "seed")


def changed_flags(saved_args, args, keys) -> list:
    """``--flag old -> new`` for each of ``keys`` whose value in the checkpoint's saved
    (JSON-stored) arguments differs from this run's."""
    def as_saved(value):
        return json.loads(json.dumps(value)) if isinstance(value, (list, tuple)) else value
    return [f"--{key.replace('_', '-')} {_flag_text(saved_args[key])} -> {_flag_text(getattr(args, key, None))}"
            for key in keys if key in saved_args and saved_args[key] != as_saved(getattr(args, key, None))]


def _flag_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def data_change_note(saved_data: Optional[dict], data: dict) -> Optional[str]:
    """A note when the data or tokenizer differs from the checkpoint's record (a dataset rebuilt
    under the same prefix, a retrained tokenizer of the same size, an imported model trained on
    data of another tokenizer): the run goes on, on other tokens. Records without fingerprints
    say nothing."""
    if not saved_data:
        return None
    changed = []
    if tokenizers_differ(saved_data.get("tokenizer"), data.get("tokenizer")):
        had, now = saved_data["tokenizer"]["sha256"], data["tokenizer"]["sha256"]
        changed.append(f"tokenizer sha256 {had[:12]} -> {now[:12]}")
    for prefix, sha in (saved_data.get("index_sha256") or {}).items():
        current = (data.get("index_sha256") or {}).get(prefix)
        if current and current != sha:
            changed.append(f"{prefix}.idx sha256 {sha[:12]} -> {current[:12]}")
    if not changed:
        return None
    return ("note: this run's data differs from what the checkpoint records ("
            + ", ".join(changed) + "); training goes on with this run's data")


def imported_tokenizer_error(saved_data: Optional[dict], data: dict) -> Optional[str]:
    """The refusal for an imported HF model whose training data was tokenized with another
    tokenizer than the model's (its token ids would mean other words to the model), or None.
    Only imports record ``file_sha256s`` (every tokenizer file of the HF directory)."""
    saved = (saved_data or {}).get("tokenizer") or {}
    now = (data or {}).get("tokenizer") or {}
    if not saved.get("file_sha256s") or not now.get("sha256") or now["sha256"] in saved["file_sha256s"]:
        return None
    model_dir = os.path.dirname(saved.get("path") or "") or "the imported model's directory"
    return (f"the data was tokenized with {now.get('path') or 'another tokenizer'}, not with the "
            f"imported model's tokenizer ({model_dir}): its token ids would mean other words to "
            f"the model; re-run tools/preprocess_data.py --tokenizer {model_dir} (or pass "
            "--allow-tokenizer-change if the tokenizer is the same one saved anew, or the "
            "vocabulary was changed on purpose)")


def schedule_change_note(saved_args, args) -> Optional[str]:
    """A note when a run continues a checkpoint with another schedule or data (e.g. a demo rerun
    without its TRAIN_ITERS, or a second experiment under the same --save): legitimate for a
    planned extension, a silent surprise otherwise."""
    changed = changed_flags(saved_args, args, SCHEDULE_ARGS)
    if not changed:
        return None
    return ("note: this run continues a checkpoint trained with other settings (" + ", ".join(changed)
            + "); the learning-rate schedule and data order follow this run's flags")
