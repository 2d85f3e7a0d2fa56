"""Configuration of SSA (Sparse Sparse Attention) causal language models: Llama-style fields plus
the SSA attention settings. Part of the model code the converter copies next to the weights."""
from transformers import PretrainedConfig

INFERENCE_MODES = ("full", "sparse")
ROPE_SCALING_TYPES = ("llama3", "linear")


class SSAConfig(PretrainedConfig):
    """Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA) with gated SSA attention.

    Architecture options (the names of ssa_megatron's training flags): ``tie_word_embeddings``
    (false: a separate ``lm_head``), ``add_qkv_bias`` (biases on q/k/v_proj, as Qwen2;
    ``attention_bias`` keeps Llama's meaning, an o_proj bias too, and must stay false),
    ``use_rope_scaling`` with ``rope_scaling_type`` (``llama3`` as Llama-3.1/3.2, or ``linear``),
    ``rope_scaling_factor``, ``rope_scaling_low_freq_factor``, ``rope_scaling_high_freq_factor``
    and ``rope_scaling_original_max_position_embeddings``, ``qk_layernorm`` (per-head RMSNorms
    ``q_norm`` / ``k_norm`` on queries and keys before RoPE, as Qwen3).

    SSA fields: ``block_size`` (tokens per selection block), ``block_counts`` (blocks each query
    attends in sparse mode, its own block included), ``inference_mode`` (``full`` or ``sparse``;
    may be changed after loading, e.g. ``model.config.inference_mode = "sparse"``),
    ``dense_layers`` (sparse mode keeps the first that many layers in full attention; default 0) and
    ``attention_mode`` (how the model was trained: ssa, full, sparse, nsa). ``attention_mode`` nsa
    makes the model an NSA model (three gated branches: compression, selection of
    ``block_counts`` blocks, a sliding window of ``window_size`` tokens; ``inference_mode`` does
    not apply). ``ssa_select_proj`` (a learned per-head map ``select_proj``: blocks are ranked
    for q + q P_h) and ``ssa_selection_score`` (``mean``; ``moment2``: each block's logit
    raised by half its per-channel key variance term; ``sub2`` / ``sub4``: the log-mean-exp over
    the means of 2 / 4 sub-blocks per block) are how the model was trained to select;
    they are read from the config as the converter wrote it.
    """

    # The converter writes every field of the model's shape (ssa_megatron/model/shape.py) into
    # config.json; the defaults below only serve configs built by hand (this file is copied into
    # exported directories and cannot import the package). Fields it does not name are kept as
    # attributes (PretrainedConfig's **kwargs).
    model_type = "ssa_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                 num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=None,
                 head_dim=None, hidden_act="silu", max_position_embeddings=8192,
                 initializer_range=0.02, rms_norm_eps=1e-5, rope_theta=500000.0, use_cache=True,
                 pad_token_id=None, bos_token_id=None, eos_token_id=None,
                 tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                 block_size=16, block_counts=16, inference_mode="full", attention_mode="ssa",
                 window_size=128, add_qkv_bias=False, use_rope_scaling=False,
                 rope_scaling_type="llama3", rope_scaling_factor=8.0,
                 rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
                 rope_scaling_original_max_position_embeddings=8192, dense_layers=0, **kwargs):
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode {inference_mode!r} must be one of {INFERENCE_MODES}")
        if attention_bias or mlp_bias:
            raise ValueError("SSA models have no o_proj or MLP biases (q/k/v biases: add_qkv_bias)")
        if use_rope_scaling and rope_scaling_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling_type {rope_scaling_type!r} must be one of {ROPE_SCALING_TYPES}")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r}: SSA models use SwiGLU (silu)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.use_cache = use_cache
        self.attention_bias = False
        self.mlp_bias = False
        self.block_size = int(block_size)
        self.block_counts = int(block_counts)
        self.inference_mode = inference_mode
        self.dense_layers = int(dense_layers)
        self.attention_mode = attention_mode
        self.window_size = int(window_size)
        self.add_qkv_bias = bool(add_qkv_bias)
        self.use_rope_scaling = bool(use_rope_scaling)
        self.rope_scaling_type = rope_scaling_type
        self.rope_scaling_factor = float(rope_scaling_factor)
        self.rope_scaling_low_freq_factor = float(rope_scaling_low_freq_factor)
        self.rope_scaling_high_freq_factor = float(rope_scaling_high_freq_factor)
        self.rope_scaling_original_max_position_embeddings = int(rope_scaling_original_max_position_embeddings)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
