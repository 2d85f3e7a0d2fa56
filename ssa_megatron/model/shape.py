"""The model's shape: one typed description of the architecture, each setting and default once.

:class:`ModelShape` lists every setting that decides what the model computes (sizes, attention
mode, imported-architecture options), each with its default, its flag help and its name in a
Hugging Face ``config.json``. Everything else is derived from it:

* the trainer's flags (:func:`add_shape_flags`; ``--num-layers`` is the field ``num_layers``);
* the checkpoint metadata: ``ssa_meta.json`` "args" holds the flags, so :meth:`ModelShape.from_args`
  reads parsed flags and saved args alike (a field missing from an older checkpoint takes its
  default) and :meth:`ModelShape.to_meta_args` writes them;
* the exported HF config (:meth:`ModelShape.to_hf_config`, :meth:`ModelShape.from_hf_config`);
* the converter and the evaluator, which pass a ModelShape around: it is a read-only mapping of
  its field names (``shape["hidden_size"]``), so plain dicts of the same names work where a
  shape is read;
* megatron-core's config: :func:`ssa_megatron.model.builder.build_config` passes every field
  that ``SSAConfig`` declares under the same name.

Adding an architecture setting is adding one field below (tests/test_model_shape.py adds one and
follows it through training, the checkpoint, the HF export and the import). The HF model code
(ssa_megatron/hf/configuration_ssa.py) is copied into exported directories and cannot import this
module: it keeps its own defaults, and stores fields it does not know as plain attributes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Dict, Iterator, Optional

ATTENTION_MODES = ("ssa", "full", "sparse", "nsa")
SELECTION_SCORES = ("mean", "moment2", "sub2", "sub4")  # ops/reference.py defines them
INFERENCE_MODES = ("full", "sparse")
ROPE_SCALING_TYPES = ("llama3", "linear")

# flag groups of the trainer (training/arguments.py names the argparse groups)
SIZE, OPTIONS, SSA = "size", "options", "ssa"

_REQUIRED = object()


def arch(default: Any, help: str, *, group: str, kind: Optional[type] = None,
         hf: Optional[str] = None, choices=None, weights: bool = False,
         print_flag: Optional[str] = None, print_as: Optional[str] = None,
         only_with: Optional[tuple] = None, hf_default: Any = None, hf_required: bool = False,
         hf_import: bool = True, hf_invert: bool = False):
    """One architecture field.

    ``default``: the value when a source does not say (``_REQUIRED``: it must say); ``help``:
    the flag's help (argparse expands ``%(default)s``); ``group``: SIZE, OPTIONS or SSA;
    ``kind``: int / float / bool / str (default: the default's type); ``hf``: its name in an HF
    config.json (default: the field name); ``weights``: it changes which tensors the model has
    (a checkpoint must agree to load); ``print_flag``: in the model flags printed after an import
    "always" (when set) or "changed" (when not the default), ``print_as`` under another flag;
    ``only_with``: (field, value) without which the field means nothing (not exported, not
    printed); ``hf_default``: the value when an HF config lacks it (the Llama convention, where
    it differs from ours); ``hf_required``: an HF config must have it; ``hf_import``: False keeps
    the default on import; ``hf_invert``: the HF field is the negation (tie vs untie).
    """
    kind = kind or (type(default) if default is not None and default is not _REQUIRED else str)
    meta = dict(help=help, group=group, type=kind, hf=hf, choices=choices, weights=weights,
                print_flag=print_flag, print_as=print_as, only_with=only_with,
                hf_default=hf_default, hf_required=hf_required or default is _REQUIRED,
                hf_import=hf_import, hf_invert=hf_invert, required=default is _REQUIRED)
    if default is _REQUIRED:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelShape(Mapping):
    """The architecture of an SSA GPT model (see the module docstring)."""

    # network size
    num_layers: int = arch(_REQUIRED, "transformer layers", group=SIZE, kind=int,
                           hf="num_hidden_layers", weights=True, print_flag="always")
    hidden_size: int = arch(_REQUIRED, "model width", group=SIZE, kind=int, weights=True,
                            print_flag="always")
    ffn_hidden_size: Optional[int] = arch(
        None, "MLP width (SwiGLU); default 4 x --hidden-size", group=SIZE, kind=int,
        hf="intermediate_size", hf_required=True, weights=True, print_flag="always")
    num_attention_heads: int = arch(_REQUIRED, "query heads", group=SIZE, kind=int, weights=True,
                                    print_flag="always")
    num_query_groups: Optional[int] = arch(
        None, "key/value heads (GQA); default: --num-attention-heads", group=SIZE, kind=int,
        hf="num_key_value_heads", weights=True, print_flag="always")
    kv_channels: Optional[int] = arch(
        None, "head dimension; default --hidden-size / --num-attention-heads", group=SIZE,
        kind=int, hf="head_dim", weights=True, print_flag="always")
    # an imported model's context is the length it trains at: printed as --seq-length
    max_position_embeddings: Optional[int] = arch(
        None, "longest position the RoPE tables cover; default --seq-length", group=SIZE,
        kind=int, hf_default=4096, print_flag="always", print_as="seq_length")
    rotary_base: float = arch(500000.0, "RoPE theta", group=SIZE, hf="rope_theta",
                              print_flag="always")
    norm_epsilon: float = arch(1e-5, "RMSNorm epsilon", group=SIZE, hf="rms_norm_eps",
                               hf_default=1e-6, print_flag="always")
    init_method_std: float = arch(0.02, "std of the normal weight initialisation", group=SIZE,
                                  hf="initializer_range")
    vocab_size: Optional[int] = arch(
        None, "only for data without a tokenizer description (PREFIX.tokenizer.json) next to it, "
              "or to give an imported model's embedding more rows than its tokenizer has",
        group=SIZE, kind=int, hf_required=True, print_flag="always")

    # architecture options of imported models (model/options.py)
    untie_embeddings_and_output_weights: bool = arch(
        False, "a separate output layer instead of the word embedding (Llama-2/3, Mistral, most "
               "models from 7B up)", group=OPTIONS, hf="tie_word_embeddings", hf_invert=True,
        weights=True, print_flag="changed")
    add_qkv_bias: bool = arch(False, "biases on the q, k and v projections (Qwen2)", group=OPTIONS,
                              weights=True, print_flag="changed")
    qk_layernorm: bool = arch(
        False, "RMSNorm on each head's queries and keys before RoPE (megatron-core's "
               "qk_layernorm; Qwen3's q_norm / k_norm)", group=OPTIONS, weights=True,
        print_flag="changed")
    use_rope_scaling: bool = arch(
        False, "scale the RoPE frequencies (--rope-scaling-type; Llama-3.1 style by default)",
        group=OPTIONS, print_flag="changed")
    rope_scaling_type: str = arch(
        "llama3", "llama3: frequencies with wavelength above original / low-freq factor divided "
                  "by the factor, below original / high-freq factor kept, blended between; "
                  "linear: all divided by the factor", group=OPTIONS, choices=ROPE_SCALING_TYPES,
        print_flag="changed", only_with=("use_rope_scaling", True))
    rope_scaling_factor: float = arch(
        8.0, "RoPE scaling factor (default %(default)s)", group=OPTIONS, print_flag="always",
        only_with=("use_rope_scaling", True))
    rope_scaling_low_freq_factor: float = arch(
        1.0, "llama3 scaling: low-frequency factor (default %(default)s)", group=OPTIONS,
        print_flag="changed", only_with=("use_rope_scaling", True))
    rope_scaling_high_freq_factor: float = arch(
        4.0, "llama3 scaling: high-frequency factor (default %(default)s)", group=OPTIONS,
        print_flag="changed", only_with=("use_rope_scaling", True))
    rope_scaling_original_max_position_embeddings: int = arch(
        8192, "llama3 scaling: the context length the unscaled model was trained at "
              "(default %(default)s)", group=OPTIONS, print_flag="changed",
        only_with=("use_rope_scaling", True))

    # SSA attention
    attention_mode: str = arch("ssa", f"one of {', '.join(ATTENTION_MODES)}", group=SSA,
                               weights=True)
    ssa_block_size: int = arch(16, "tokens per block (selection granularity)", group=SSA,
                               hf="block_size")
    ssa_block_counts: int = arch(
        16, "blocks each query attends in the sparse branch (its own block included)", group=SSA,
        hf="block_counts")
    nsa_window_size: int = arch(
        128, "--attention-mode nsa: tokens of the sliding-window branch (itself included)",
        group=SSA, hf="window_size", only_with=("attention_mode", "nsa"))
    inference_mode: Optional[str] = arch(
        None, "branch used in evaluation: full or sparse; default: the mode's natural one",
        group=SSA)
    ssa_select_proj: bool = arch(
        False, "a learned per-head map of the queries SSA's block selection scores with "
               "(q + q P_h, P_h starting at 0), trained only by --ssa-select-align-coef",
        group=SSA, weights=True, print_flag="changed")
    ssa_selection_score: str = arch(
        "mean", "how the selection scores a block: mean (the paper's: the query against the "
                "block's mean key), moment2 (plus half the per-channel key variance term, a "
                "second-order estimate of the block's attention share), or sub2 / sub4 (the "
                "log-mean-exp of the query against the means of 2 or 4 sub-blocks of each "
                "block)", group=SSA,
        choices=SELECTION_SCORES, print_flag="changed")
    # new fields above this line (tests/test_model_shape.py adds one here)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata["required"]:
                raise TypeError(f"ModelShape needs {f.name}")
            if value is not None:
                object.__setattr__(self, f.name, f.metadata["type"](value))
        # settings whose default depends on others
        derived = {"ffn_hidden_size": lambda: 4 * self.hidden_size,
                   "num_query_groups": lambda: self.num_attention_heads,
                   "kv_channels": lambda: self.hidden_size // self.num_attention_heads}
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value())

    # -- a read-only mapping of the field names
    def __getitem__(self, name: str):
        if name not in _field_names():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(_field_names())

    def __len__(self) -> int:
        return len(_field_names())

    def replace(self, **changes) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    @property
    def natural_inference_mode(self) -> str:
        if self.inference_mode is not None:
            return self.inference_mode
        return "sparse" if self.attention_mode == "sparse" else "full"

    def applies(self, name: str) -> bool:
        """Whether field ``name`` means anything for this model (see ``only_with``)."""
        cond = _field(name).metadata["only_with"]
        return cond is None or self[cond[0]] == cond[1]

    # -- flags and checkpoint metadata
    @classmethod
    def from_args(cls, source, **overrides) -> "ModelShape":
        """The shape of parsed flags, saved checkpoint args (ssa_meta.json "args") or any mapping
        of the field names; missing or null entries take their defaults (or derive from others:
        max positions from ``seq_length``)."""
        values = vars(source) if not isinstance(source, Mapping) else dict(source)
        kw = {name: values.get(name) for name in _field_names()}
        if kw["max_position_embeddings"] is None:
            kw["max_position_embeddings"] = (values.get("seq_length")
                                             or _field("max_position_embeddings").metadata["hf_default"])
        kw.update(overrides)
        for f in dataclasses.fields(cls):
            if kw[f.name] is None and f.metadata["required"]:
                raise KeyError(f.name)
            if kw[f.name] is None:
                kw[f.name] = f.default
        return cls(**kw)

    @classmethod
    def from_meta(cls, meta: dict, embedding_rows: int) -> "ModelShape":
        """The shape of a checkpoint from its ssa_meta.json (the recorded flags)."""
        args = meta["args"]
        tok = (meta.get("data") or {}).get("tokenizer") or {}
        # --vocab-size, when given, is the model's (it may exceed the tokenizer's: imported embeddings)
        vocab = args.get("vocab_size") or tok.get("vocab_size") or embedding_rows
        return cls.from_args(args, vocab_size=vocab)

    def to_meta_args(self, tp: int) -> dict:
        """The flags a weights-only checkpoint records (what --load checks against)."""
        args = dict(self)
        if self.kv_channels * self.num_attention_heads == self.hidden_size:
            args["kv_channels"] = None  # the default: as a run without --kv-channels records it
        args.update(seq_length=self.max_position_embeddings, tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=1)
        return args

    def training_flags(self) -> list:
        """The trainer's model flags that rebuild this model after an import (what --load checks,
        plus RoPE); data, batch, parallel and attention flags are the user's."""
        flags, args = [], self.to_meta_args(1)
        for f in dataclasses.fields(self):
            value, when = args[f.name], f.metadata["print_flag"]
            if when is None or value is None or not self.applies(f.name):
                continue
            if f.metadata["type"] is bool:
                if value:
                    flags.append(_flag(f.name))
            elif when == "always" or value != f.default:
                flags += [_flag(f.metadata["print_as"] or f.name),
                          f"{value:g}" if isinstance(value, float) else str(value)]
        return flags

    # -- Hugging Face config.json
    def to_hf_config(self) -> dict:
        """The config.json fields of this shape (the model code's names)."""
        cfg = {}
        for f in dataclasses.fields(self):
            if not self.applies(f.name):
                continue
            value = getattr(self, f.name)
            if f.name == "inference_mode":
                value = self.natural_inference_mode  # the export names the mode it runs in
            cfg[f.metadata["hf"] or f.name] = (not value) if f.metadata["hf_invert"] else value
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: Mapping, **overrides) -> "ModelShape":
        """The shape of an HF config.json; ``overrides`` win (the importer's parsed RoPE)."""
        kw = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["hf"] or f.name
            if f.name in overrides or not f.metadata["hf_import"]:
                continue
            if f.metadata["hf_required"]:
                value = cfg[name]
            else:
                value = cfg.get(name)
            if value is not None and f.metadata["hf_invert"]:
                value = not value
            if value is None:
                value = f.metadata["hf_default"]
            kw[f.name] = value
        kw.update(overrides)
        return cls.from_args(kw)


def _field_names() -> tuple:
    return tuple(f.name for f in dataclasses.fields(ModelShape))


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(ModelShape) if f.name == name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shape_default(name: str):
    """The default of field ``name``."""
    return _field(name).default


def shape_fields(group: Optional[str] = None, weights: Optional[bool] = None) -> tuple:
    """Field names, optionally of one flag group and / or those that change the weights."""
    return tuple(f.name for f in dataclasses.fields(ModelShape)
                 if (group is None or f.metadata["group"] == group)
                 and (weights is None or f.metadata["weights"] == weights))


def shape_help(name: str) -> str:
    return _field(name).metadata["help"]


def add_shape_flags(groups: Dict[str, Any]) -> None:
    """Add a flag for every field to ``groups[field's group]`` (argparse argument groups)."""
    for f in dataclasses.fields(ModelShape):
        meta, group = f.metadata, groups[f.metadata["group"]]
        if meta["type"] is bool:
            group.add_argument(_flag(f.name), action="store_true", help=meta["help"])
            continue
        kw = dict(default=f.default, help=meta["help"])
        if meta["required"]:
            kw = dict(required=True, help=meta["help"])
        if meta["type"] in (int, float):
            kw["type"] = meta["type"]
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        group.add_argument(_flag(f.name), **kw)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Pad the vocabulary to a multiple of ``multiple`` that TP divides.

    Unlike Megatron-LM (multiple x TP), the result does not grow with TP when it need not, so the
    same model (and its checkpoint) keeps one embedding shape across layouts.
    """
    size = (vocab_size + multiple - 1) // multiple * multiple
    while size % tp:
        size += multiple
    return size
