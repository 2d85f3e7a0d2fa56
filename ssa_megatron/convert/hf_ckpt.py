"""Hugging Face directories: write ours (config, safetensors, model code, tokenizer); read ours, the
SSA paper authors' layout and plain Llama (2, 3, 3.1/3.2), Mistral, Qwen2, Qwen3 and Phi-3 models.

Written directory::

    config.json                  Llama-style fields + block_size, block_counts, inference_mode,
                                 attention_mode (+ window_size for nsa), tie_word_embeddings,
                                 add_qkv_bias, qk_layernorm, use_rope_scaling (+ rope_scaling_*
                                 when on), ssa_select_proj, ssa_selection_score (every field of
                                 model/shape.py); auto_map -> configuration_ssa / modeling_ssa
    model.safetensors            (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    configuration_ssa.py, modeling_ssa.py, ssa_cache.py   copied from ssa_megatron/hf/
    ssa_ops.py                   copied from ssa_megatron/ops/reference.py (the attention math)
    ssa_nsa.py                   ssa_megatron/ops/nsa.py, importing ssa_ops.py (NSA's branches)
    tokenizer.model + tokenization_ssa.py (SentencePiece, exact sentencepiece ids; load with
    AutoTokenizer.from_pretrained(dir, trust_remote_code=True)) or tokenizer.json (HF tokenizers),
    tokenizer_config.json        when the checkpoint's data description names its tokenizer

Reading (:func:`read_hf`) uses safetensors only and returns our HF naming with ``g_proj`` of shape
[heads, hidden]:

* our exports (``model_type`` ssa_llama): as they are;
* the paper's released layout: ``g_proj`` with 3 gates per head (compression, selection, window,
  interleaved per head): the selection gate is kept (all three, unchanged, when imported with
  attention mode nsa);
* NSA exports (``attention_mode`` nsa, ``window_size``): ``g_proj`` [3 * heads, hidden] as is;
* plain Llama, Mistral, Qwen2, Qwen3, Phi-3 (no ``g_proj``; Phi-3's fused ``qkv_proj`` and
  ``gate_up_proj`` split): gate weights zero (sigmoid 0.5 on every head) and ``o_proj`` doubled,
  so the imported model computes exactly what the source model computed (in full attention). Their untied ``lm_head``, q/k/v biases (Qwen2), per-head q/k
  RMSNorms (Qwen3's ``q_norm`` / ``k_norm``: ``qk_layernorm``) and default, linear or llama3
  RoPE (Llama-3.1/3.2) carry over as the options of model/options.py. What an SSA model cannot
  compute is refused in one line naming the config field: sliding-window attention
  (``sliding_window``, ``use_sliding_window``, ``layer_types``), mixture-of-experts MLPs, other
  RoPE types, partial rotary dimensions, o_proj or MLP biases, activations other than silu.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import torch

from ssa_megatron.convert.layout import ConversionError
from ssa_megatron.model.options import ROPE_SCALING_TYPES, model_options
from ssa_megatron.model.shape import ModelShape, shape_default

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
MODEL_TYPE = "ssa_llama"
AUTO_MAP = {"AutoConfig": "configuration_ssa.SSAConfig",
            "AutoModel": "modeling_ssa.SSAModel",
            "AutoModelForCausalLM": "modeling_ssa.SSAForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(shape: Mapping, tokenizer: Optional[dict] = None, dtype: str = "float32") -> dict:
    """config.json of a model of ``shape`` (a ModelShape or a mapping of its field names)."""
    shape = shape if isinstance(shape, ModelShape) else ModelShape.from_args(shape)
    cfg = {
        "architectures": ["SSAForCausalLM"], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
        "hidden_act": "silu", "use_cache": True,
        "attention_bias": False, "mlp_bias": False,  # Llama's meaning: o_proj / MLP biases (none)
        "dtype": dtype, **shape.to_hf_config(),
    }
    if tokenizer and tokenizer.get("eod") is not None:
        cfg["eos_token_id"] = int(tokenizer["eod"])
    return cfg


def _save_safetensors(state: Dict[str, torch.Tensor], out: str, max_shard_size) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, os.path.join(out, filename),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


# ops/nsa.py's imports of the ssa_megatron package, and what its HF copy imports instead: the
# local reference copy (ssa_ops.py) and a dispatch stand-in that always picks the reference kernels
_NSA_IMPORTS = "from ssa_megatron.ops import dispatch\nfrom ssa_megatron.ops import reference as ref\n"
_NSA_LOCAL_IMPORTS = (
    "from types import SimpleNamespace\n\n"
    "from . import ssa_ops as ref  # HF copy of ssa_megatron/ops/reference.py\n"
    "from .ssa_ops import select_blocks as _select_blocks  # noqa: F401 (transformers copies ssa_ops)\n\n"
    "# no Triton dispatch in an HF directory: the reference kernels (modeling_ssa.py uses\n"
    "# ssa_megatron.ops.nsa itself on CUDA when ssa_megatron is installed)\n"
    "dispatch = SimpleNamespace(get_backend=lambda: \"reference\", select_blocks=ref.select_blocks,\n"
    "                           sparse_attention=ref.sparse_attention)\n")


def nsa_model_code() -> str:
    """ssa_megatron/ops/nsa.py with its package imports rewritten to the HF directory's copies."""
    with open(os.path.join(PKG, "ops", "nsa.py")) as f:
        text = f.read()
    rest = text.replace(_NSA_IMPORTS, "")
    if text.count(_NSA_IMPORTS) != 1 or re.search(r"^\s*(from|import)\s+ssa_megatron", rest, re.M):
        raise ConversionError("ssa_megatron/ops/nsa.py changed its imports; update _NSA_IMPORTS in "
                              "ssa_megatron/convert/hf_ckpt.py so its HF copy stays self-contained")
    header = "# Copied from ssa_megatron/ops/nsa.py by the converter (imports rewritten to local copies).\n"
    return header + text.replace(_NSA_IMPORTS, _NSA_LOCAL_IMPORTS)


def copy_model_code(out: str) -> None:
    from ssa_megatron.hf import MODEL_FILES, NSA_FILE, OPS_FILE
    for name in MODEL_FILES:
        shutil.copyfile(os.path.join(PKG, "hf", name), os.path.join(out, name))
    shutil.copyfile(os.path.join(PKG, "ops", "reference.py"), os.path.join(out, OPS_FILE))
    with open(os.path.join(out, NSA_FILE), "w") as f:
        f.write(nsa_model_code())


def find_tokenizer_file(data: dict) -> Tuple[Optional[str], Optional[dict]]:
    """(path of the tokenizer file, its description) from ssa_meta.json's ``data``."""
    tok = (data or {}).get("tokenizer") or {}
    kind = tok.get("kind")
    if kind not in ("sentencepiece", "huggingface"):
        return None, tok or None
    candidates = []
    if tok.get("file"):
        for prefix in (data.get("data_path") or []):
            candidates.append(os.path.join(os.path.dirname(os.path.abspath(prefix)), tok["file"]))
    if tok.get("path"):
        candidates.append(tok["path"])
    for c in candidates:
        if os.path.isfile(c):
            return c, tok
    return None, tok


def write_tokenizer(out: str, data: dict) -> Optional[str]:
    """Copy the training tokenizer into ``out``; returns a note when it cannot be found."""
    path, tok = find_tokenizer_file(data)
    if path is None:
        if tok and tok.get("kind") in ("sentencepiece", "huggingface"):
            return (f"tokenizer {tok.get('path')} not found: the HF directory has no tokenizer "
                    "files; copy them in by hand")
        return None
    if tok.get("sha256") and tok["sha256"] != "none":
        from ssa_megatron.data.tokenizer import file_sha256
        if file_sha256(path) != tok["sha256"]:
            return f"tokenizer {path} changed since the data was built (sha256 differs): not copied"
    eod = tok.get("eod")
    if tok["kind"] == "sentencepiece":
        import sentencepiece as spm
        shutil.copyfile(path, os.path.join(out, "tokenizer.model"))
        sp = spm.SentencePieceProcessor(model_file=path)
        # BOS before a text exactly when the training data began its documents with it
        add_bos = sp.bos_id() >= 0 and list(tok.get("bos") or []) == [sp.bos_id()]
        piece = lambda i: sp.id_to_piece(int(i)) if i is not None and 0 <= int(i) < sp.get_piece_size() else None  # noqa: E731
        shutil.copyfile(os.path.join(PKG, "hf", "tokenization_ssa.py"), os.path.join(out, "tokenization_ssa.py"))
        cfg = {"tokenizer_class": "SSASentencePieceTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_ssa.SSASentencePieceTokenizer", None]},
               "add_bos_token": add_bos, "special_tokens_pattern": "bos" if add_bos else "none",
               "add_eos_token": False, "legacy": True,
               "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30,
               "eos_token": piece(eod), "unk_token": piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
               "bos_token": piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
               "pad_token": piece(sp.pad_id()) if sp.pad_id() >= 0 else None}
    else:
        shutil.copyfile(path, os.path.join(out, "tokenizer.json"))
        from tokenizers import Tokenizer
        t = Tokenizer.from_file(path)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
               "eos_token": t.id_to_token(int(eod)) if eod is not None else None}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2)
    return None


def write_hf(out_dir: str, hf_state: Dict[str, torch.Tensor], shape: Mapping, data: Optional[dict] = None,
             dtype: str = "float32", max_shard_size="5GB") -> list:
    """Write an HF directory (atomically: temp dir renamed into place). Returns notes."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"output {out_dir} exists and is not empty; choose a new directory")
    notes = []
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        state = {k: v.to(DTYPES[dtype]) for k, v in hf_state.items()}
        _save_safetensors(state, tmp, max_shard_size)
        tok = ((data or {}).get("tokenizer") or {})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(shape, tok, dtype), f, indent=2, sort_keys=True)
        copy_model_code(tmp)
        note = write_tokenizer(tmp, data or {})
        if note:
            notes.append(note)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return notes


def _publish(tmp: str, out_dir: str) -> None:
    """Give the finished temp dir ordinary permissions and rename it to ``out_dir``."""
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)


# ---------------------------------------------------------------------------------------------
# reading


def load_safetensors_dir(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{path} has no model.safetensors (or index): only safetensors "
                              "weights are read; convert .bin weights with transformers first")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def _rope_from_hf(cfg: dict) -> Tuple[float, dict]:
    """(RoPE base, the RoPE options of model/options.py) of an HF config: ours (flat option
    fields), or transformers' ``rope_parameters`` (v5) / ``rope_theta`` + ``rope_scaling`` (v4)."""
    if "use_rope_scaling" in cfg:  # our export
        return float(cfg.get("rope_theta") or shape_default("rotary_base")), {
            k: cfg.get(k) for k in model_options({}) if k.startswith(("use_rope", "rope_scaling"))}
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{field} differs per layer type: SSA models use one RoPE for all layers")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"partial_rotary_factor={partial}: SSA models rotate the whole head")
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, {"use_rope_scaling": False}
    if kind not in ROPE_SCALING_TYPES:
        raise ConversionError(f"{field} rope_type {kind!r} is not supported: SSA models import "
                              f"default, {' and '.join(ROPE_SCALING_TYPES)} RoPE")
    options = {"use_rope_scaling": True, "rope_scaling_type": kind,
               "rope_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        options.update(
            rope_scaling_low_freq_factor=float(params["low_freq_factor"]),
            rope_scaling_high_freq_factor=float(params["high_freq_factor"]),
            rope_scaling_original_max_position_embeddings=int(
                params.get("original_max_position_embeddings") or cfg["max_position_embeddings"]))
    return theta, options


# config fields of mixture-of-experts models (Mixtral, Qwen2-MoE, DeepSeek)
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def check_importable(cfg: dict) -> None:
    """Refuse, in one line naming the config field, what an SSA model cannot compute."""
    for field in _MOE_FIELDS:
        if cfg.get(field):
            raise ConversionError(f"{field}={cfg[field]}: a mixture-of-experts model "
                                  f"({cfg.get('model_type')}) cannot be imported; SSA models have "
                                  "one dense SwiGLU MLP per layer")
    if cfg.get("use_sliding_window"):
        raise ConversionError("use_sliding_window is true: sliding-window attention cannot be "
                              "imported (SSA attends the whole context); set it to false in "
                              "config.json to import the model as full attention")
    window, longest = cfg.get("sliding_window"), cfg.get("max_position_embeddings")
    if (window is not None and cfg.get("use_sliding_window") is not False
            and (longest is None or int(window) < int(longest))):
        raise ConversionError(f"sliding_window={window}: the model attends only its last {window} "
                              "tokens, SSA attends the whole context; set sliding_window to null "
                              f"in config.json to import it as full attention (the same outputs "
                              f"up to {window} tokens)")
    kinds = sorted(set(cfg.get("layer_types") or []) - {"full_attention"})
    if kinds:
        raise ConversionError(f"layer_types has {', '.join(kinds)} layers: SSA models import "
                              "full-attention layers only")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {cfg.get('hidden_act')!r}: SSA models use SwiGLU (silu)")


def shape_from_hf_config(cfg: dict) -> ModelShape:
    """The model shape of an HF config (ours, or another model's: RoPE from its own fields).
    Where the config does not say, read_hf decides ``untie_embeddings_and_output_weights`` (and,
    for other models than ours, ``add_qkv_bias``) from the tensors."""
    check_importable(cfg)
    rotary_base, rope = _rope_from_hf(cfg)
    return ModelShape.from_hf_config(cfg, rotary_base=rotary_base, **rope)


def _normalise_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        k = k.replace(".attn.", ".self_attn.")  # fla-style attention module name
        if k.startswith("layers.") or k.startswith("embed_tokens.") or k.startswith("norm."):
            k = "model." + k
        out[k] = v
    return out


def read_hf(path: str, attention_mode: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], ModelShape, str]:
    """(HF SSA state dict, model shape, flavour) of an HF directory.

    ``g_proj`` comes back as [heads, hidden] (one gate per head), or, when the model is (or is
    imported as, ``attention_mode``) an NSA model, as [3 * heads, hidden] unchanged (compression,
    selection, window per head: megatron's ``linear_gate`` of --attention-mode nsa).
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{path} has no config.json; pass a Hugging Face model directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    shape = shape_from_hf_config(cfg)
    if attention_mode is not None:
        shape = shape.replace(attention_mode=attention_mode)
    nsa = shape.attention_mode == "nsa"
    state = _normalise_names(load_safetensors_dir(path))
    if cfg.get("model_type") == "phi3":  # Phi-3 and Phi-4 (Phi3ForCausalLM)
        state = _split_fused_projections(state, shape)
    emb = state.get("model.embed_tokens.weight")
    if emb is None:
        raise ConversionError(f"{path} has no model.embed_tokens.weight; not a Llama-style model")
    head = state.get("lm_head.weight")
    untied = shape.untie_embeddings_and_output_weights
    if cfg.get("tie_word_embeddings") is None:  # not said: an lm_head of its own makes it untied
        untied = head is not None and not torch.equal(head, emb)
    elif untied and head is None:
        raise ConversionError(f"{path}: tie_word_embeddings is false but there is no lm_head.weight")
    if not untied:
        state.pop("lm_head.weight", None)  # tied: transformers uses the embedding (as we do)
    shape = shape.replace(untie_embeddings_and_output_weights=bool(untied),
                          add_qkv_bias=_has_qkv_bias(state, cfg, shape),
                          qk_layernorm=_has_head_norms(state, cfg, shape))
    heads, hidden = shape.num_attention_heads, shape.hidden_size
    flavour = "ssa" if cfg.get("model_type") == MODEL_TYPE else None
    for i in range(shape.num_layers):
        p = f"model.layers.{i}.self_attn."
        g = state.get(p + "g_proj.weight")
        if g is None:
            if nsa:
                raise ConversionError(f"{path} has no g_proj (a plain Llama model): it cannot be "
                                      "imported as an NSA model (attention mode nsa)")
            flavour = flavour or "llama"
            state[p + "g_proj.weight"] = torch.zeros(heads, hidden, dtype=state[p + "o_proj.weight"].dtype)
            state[p + "o_proj.weight"] = state[p + "o_proj.weight"] * 2  # sigmoid(0) = 0.5
        elif g.shape[0] == 3 * heads:
            flavour = flavour or "paper"
            if not nsa:  # SSA keeps the selection gate
                state[p + "g_proj.weight"] = g.view(heads, 3, hidden)[:, 1].clone()
        elif nsa:
            raise ConversionError(f"{p}g_proj has {g.shape[0]} rows; an NSA model has {3 * heads} "
                                  "(compression, selection, window per head)")
        elif g.shape[0] != heads:
            raise ConversionError(f"{p}g_proj has {g.shape[0]} rows; expected {heads} (one gate per "
                                  f"head) or {3 * heads} (compression, selection, window per head)")
        else:
            flavour = flavour or "ssa"
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(shape.num_layers) for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.g_proj",
            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm")}
    if shape.untie_embeddings_and_output_weights:
        expected.add("lm_head.weight")
    if shape.add_qkv_bias:
        expected |= {f"model.layers.{i}.self_attn.{x}_proj.bias"
                     for i in range(shape.num_layers) for x in "qkv"}
    if shape.ssa_select_proj:
        expected |= {f"model.layers.{i}.self_attn.select_proj" for i in range(shape.num_layers)}
    if shape.qk_layernorm:
        expected |= {f"model.layers.{i}.self_attn.{x}_norm.weight"
                     for i in range(shape.num_layers) for x in "qk"}
    missing = sorted(expected - set(state))
    if missing:
        raise ConversionError(f"{path} lacks {len(missing)} expected tensors, e.g. {missing[0]}")
    extra = sorted(set(state) - expected)
    if extra:
        raise ConversionError(f"{path} has tensors an SSA model does not use, e.g. {extra[0]} "
                              "(compression / sliding-window branches are not imported)")
    return {k: state[k] for k in sorted(expected)}, shape, flavour


def _split_fused_projections(state: Dict[str, torch.Tensor], shape: ModelShape) -> Dict[str, torch.Tensor]:
    """Phi-3's fused ``qkv_proj`` ([q; k; v] rows) and ``gate_up_proj`` ([gate; up] rows) as
    the separate projections of the Llama layout."""
    q_rows = shape.num_attention_heads * shape.kv_channels
    kv_rows = shape.num_query_groups * shape.kv_channels
    for name in [n for n in state if ".self_attn.qkv_proj." in n]:
        fused = state.pop(name)
        if fused.shape[0] != q_rows + 2 * kv_rows:
            raise ConversionError(f"{name} has {fused.shape[0]} rows; the config's heads make "
                                  f"{q_rows} + 2 x {kv_rows} (q, k, v)")
        for x, part in zip("qkv", fused.split([q_rows, kv_rows, kv_rows])):
            state[name.replace(".qkv_proj.", f".{x}_proj.")] = part.clone()
    for name in [n for n in state if ".mlp.gate_up_proj." in n]:
        fused = state.pop(name)
        if fused.shape[0] != 2 * shape.ffn_hidden_size:
            raise ConversionError(f"{name} has {fused.shape[0]} rows; the config's "
                                  f"intermediate_size makes 2 x {shape.ffn_hidden_size} (gate, up)")
        gate, up = fused.chunk(2, dim=0)
        state[name.replace(".gate_up_proj.", ".gate_proj.")] = gate.clone()
        state[name.replace(".gate_up_proj.", ".up_proj.")] = up.clone()
    return state


def _has_head_norms(state: Dict[str, torch.Tensor], cfg: dict, shape: ModelShape) -> bool:
    """Qwen3's per-head q/k RMSNorms (``q_norm`` / ``k_norm`` of head_dim weights) become
    ``qk_layernorm``; norms over the whole projection (OLMo-2's) are refused in one line."""
    norm = state.get("model.layers.0.self_attn.q_norm.weight")
    if norm is None:
        return shape.qk_layernorm
    if tuple(norm.shape) != (shape.kv_channels,):
        raise ConversionError(f"{cfg.get('model_type')}: q_norm has {tuple(norm.shape)} weights, "
                              f"not one per channel of a {shape.kv_channels}-channel head; SSA "
                              "models norm each head's queries and keys (as Qwen3) only")
    return True


def _has_qkv_bias(state: Dict[str, torch.Tensor], cfg: dict, shape: ModelShape) -> bool:
    """q/k/v biases (Qwen2) become ``add_qkv_bias``; o_proj and MLP biases are refused, naming
    the config field that put them there."""
    names = set(state)
    if any(n.endswith("self_attn.o_proj.bias") for n in names):
        raise ConversionError(f"attention_bias={cfg.get('attention_bias')}: o_proj has a bias "
                              "(Llama layout); SSA models take q/k/v biases only (as Qwen2)")
    if any(".mlp." in n and n.endswith(".bias") for n in names):
        raise ConversionError(f"mlp_bias={cfg.get('mlp_bias')}: the MLP has biases, SSA models have none")
    return shape.add_qkv_bias or "model.layers.0.self_attn.q_proj.bias" in names


TOKENIZER_FILES = (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "huggingface"))


def tokenizer_data_from_hf(path: str, vocab_size: int) -> dict:
    """A ssa_meta.json ``data`` entry naming the tokenizer inside an HF directory (if any), with
    the sha256 of each of its tokenizer files (``file_sha256s``: the same tokenizer in another
    format, either of which the data may have been made with)."""
    from ssa_megatron.data.tokenizer import file_sha256
    present = [(os.path.join(path, name), kind) for name, kind in TOKENIZER_FILES
               if os.path.isfile(os.path.join(path, name))]
    shas = {p: file_sha256(p) for p, _ in present}  # each file read once
    if present:  # the first of TOKENIZER_FILES names the tokenizer
        p, kind = present[0]
        eod = None
        try:
            with open(os.path.join(path, "config.json")) as f:
                eod = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            pass
        return {"tokenizer": {"kind": kind, "path": os.path.abspath(p), "file": None,
                              "vocab_size": vocab_size, "eod": eod, "sha256": shas[p],
                              "file_sha256s": sorted(shas.values())}}
    return {"tokenizer": {"kind": "unknown", "vocab_size": vocab_size}}
