"""Model FLOPs per token, the dense-transformer formula used for TFLOP/s and MFU.

flops/token = 6 * N + 6 * L * s * (heads * head_dim): N counts every matmul weight (attention
projections and gate, MLP, and the output head, which is tied to the embedding), and the second
term is causal full attention (QK^T and AV, forward + backward, half the square). The sparse
branch is not counted: MFU compares against the dense model, as the paper's numbers do.
"""
from __future__ import annotations


def flops_per_token(args, vocab_size: int) -> float:
    h = args.hidden_size
    d = args.kv_channels or h // args.num_attention_heads
    heads, groups = args.num_attention_heads, args.num_query_groups
    attn = h * heads * d + 2 * h * groups * d + heads * d * h + h * heads  # q, k, v, o, gate
    mlp = 3 * h * args.ffn_hidden_size  # SwiGLU: gate, up, down
    n = args.num_layers * (attn + mlp) + h * vocab_size
    return 6.0 * n + 6.0 * args.num_layers * args.seq_length * heads * d
