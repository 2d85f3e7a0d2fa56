"""Data path: tokenizers and corpus tools → .bin/.idx → megatron-core GPT datasets."""
