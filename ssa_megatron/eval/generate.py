"""tools/generate.py: text from a Hugging Face export (``tools/convert_checkpoint.py to-hf``) in
full and in sparse attention, one after the other, from the same prompt.

Loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` as any
transformers user would; the mode and the block budget are set with the exported model's
``set_inference_mode``. Greedy by default (the two modes then differ only through attention);
``--temperature`` > 0 samples, with the same seed for both modes. Runs on the GPU when there is
one (bf16; sparse decoding through the Triton decode kernels), else on the CPU (fp32), and prints
each mode's generation time.
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional


def build_parser():
    from ssa_megatron.console import make_parser
    p = make_parser(description=__doc__)
    p.add_argument("--model", required=True, metavar="HF_DIR",
                   help="directory written by tools/convert_checkpoint.py to-hf")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per mode")
    p.add_argument("--modes", nargs="+", default=["full", "sparse"], choices=["full", "sparse"],
                   help="attention modes, in this order")
    p.add_argument("--block-counts", type=int, default=None,
                   help="sparse mode: blocks each query attends; default: the model's (config.json)")
    p.add_argument("--dense-layers", type=int, default=0, metavar="N",
                   help="sparse mode: keep the first N layers in full attention (hybrid)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (the same for every mode)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when there is one (sparse decoding then runs the Triton "
                        "decode kernels when ssa_megatron is installed), else the CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on the GPU, fp32 on the CPU")
    return p


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def device_and_dtype(device: str, dtype: str):
    """(torch.device, torch.dtype, dtype name) for --device / --dtype; 'cuda' without a GPU is
    an error."""
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU here; use --device cpu")
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    return torch.device(device), getattr(torch, DTYPES[dtype]), dtype


def generate(model, tokenizer, prompt: str, mode: str, max_new_tokens: int,
             block_counts: Optional[int] = None, temperature: float = 0.0, top_p: float = 0.9,
             seed: int = 1234, dense_layers: int = 0) -> str:
    """The continuation (text after the prompt) in one attention mode."""
    import torch
    model.set_inference_mode(mode, block_counts, dense_layers=dense_layers)
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=model.device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=tokenizer.eos_token_id, **sampling)
    # decoded whole, then cut: a continuation decoded alone loses the space of its first piece
    return tokenizer.decode(out[0].tolist())[len(tokenizer.decode(ids[0].tolist())):]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def context_note(prompt_tokens: int, max_new_tokens: int, trained_context: int) -> Optional[str]:
    """A note when the generation runs past the context the model was trained at (its RoPE
    positions there were never seen in training), naming the largest --max-new-tokens that stays
    inside; None when it stays inside."""
    if prompt_tokens + max_new_tokens <= trained_context:
        return None
    inside = trained_context - prompt_tokens
    fix = (f"--max-new-tokens {inside} or fewer stays inside it" if inside >= 1 else
           "shorten the prompt to stay inside it")
    return (f"note: the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} run past "
            f"the model's {trained_context} positions (max_position_embeddings: the length it "
            f"trained at unless set longer), where its text is unreliable; {fix}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        trained = os.path.isfile(os.path.join(args.model, "latest"))  # a training checkpoint
        target = f"{args.model.rstrip('/')}-hf" if trained else "HF_DIR"
        source = args.model if trained else "CHECKPOINT_DIR"
        print(f"error: --model {args.model} holds no config.json; write a Hugging Face directory "
              f"with: python tools/convert_checkpoint.py to-hf --input {source} --output {target}, "
              "then pass that directory", file=sys.stderr)
        return 2
    if not args.prompt:
        print("error: --prompt is empty; give the text to continue", file=sys.stderr)
        return 2
    if args.block_counts is not None and args.block_counts < 1:
        print("error: --block-counts must be at least 1 (leave it out for the model's own)", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.dense_layers < 0:
        print("error: --dense-layers must be 0 or more", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    device, dtype, dtype_name = device_and_dtype(args.device, args.dtype)
    if not any(os.path.isfile(os.path.join(args.model, f)) for f in TOKENIZER_FILES):
        print(f"error: --model {args.model} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}): "
              "copy the tokenizer the model was trained with into it (to-hf copies it when the "
              "training data's tokenizer file is still where preprocessing found it)", file=sys.stderr)
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"error: cannot load the tokenizer of {args.model} ({first}); check its tokenizer "
              "files", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True,
                                                 dtype=dtype).to(device).eval()
    budget = args.block_counts if args.block_counts is not None else model.config.block_counts
    note = context_note(len(tokenizer.encode(args.prompt)), args.max_new_tokens,
                        model.config.max_position_embeddings)
    if note:
        print(note, file=sys.stderr)
    if args.dense_layers > model.config.num_hidden_layers:
        print(f"error: --dense-layers {args.dense_layers}: the model has "
              f"{model.config.num_hidden_layers} layers", file=sys.stderr)
        return 2
    for mode in args.modes:
        if device.type == "cuda":  # compile this mode's kernels outside the timed generation
            generate(model, tokenizer, args.prompt, mode, 2, budget, dense_layers=args.dense_layers)
            torch.cuda.synchronize()
        start = time.perf_counter()
        text = generate(model, tokenizer, args.prompt, mode, args.max_new_tokens, budget,
                        args.temperature, args.top_p, args.seed, args.dense_layers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        nsa = getattr(model.config, "attention_mode", "ssa") == "nsa"
        dense = f", the first {args.dense_layers} layer(s) full" if args.dense_layers and not nsa else ""
        what = (f"sparse attention, {budget} blocks of {model.config.block_size} tokens per query{dense}"
                if mode == "sparse" else "full attention")
        print(f"--- {what} ({args.max_new_tokens} tokens in {seconds:.2f} s on {device.type}, "
              f"{dtype_name})\n{args.prompt}{text}\n", flush=True)
    return 0
