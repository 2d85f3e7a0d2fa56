"""tools/evaluate.py: perplexity (full / sparse x block budgets x lengths), attention sparsity,
alignment gap and needle retrieval of an ssa_megatron checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

import torch

USAGE = """\
examples:
  # one GPU, held-out split of the training data, 4096-token windows, bf16
  python tools/evaluate.py --checkpoint runs/ssa/checkpoints --data-path data/corpus_text_document \\
      --split-name valid --seq-length 4096 --block-counts 2 4 8 16 32 --max-windows 64 \\
      --micro-batch-size 4 --bf16 --json out.json --plot out.png
  # beyond the training length with llama3-style RoPE scaling, sliding windows of stride 1024
  python tools/evaluate.py --checkpoint CKPT --data-path PREFIX --seq-length 4096 16384 \\
      --rope-scaling-factor auto --stride 1024 --json long.json
  # raw text / jsonl, tokenised with the checkpoint's tokenizer (or --tokenizer)
  python tools/evaluate.py --checkpoint CKPT --text book.txt docs.jsonl --json-keys text
  # several GPUs: each rank evaluates a share of the windows, sums are all-reduced
  torchrun --nproc-per-node 8 tools/evaluate.py --checkpoint CKPT --data-path PREFIX ...

Perplexity is exp(mean next-token cross-entropy) over all scored tokens of the windows, over the
tokenizer's vocabulary: the output rows megatron-core pads the vocabulary with are left out, as in
the Hugging Face export, so it reads slightly lower than training's logged loss (docs/FIRST_RUN.md). --rope-scaling-factor applies only to lengths above the
training length (others run unscaled); 'auto' uses length / training length. Sparsity and the
alignment gap come from the first --sparsity-windows windows at --sparsity-length in full mode
(see ssa_megatron/eval/sparsity.py for the exact definitions). The needle test needs a tokenizer
(the checkpoint's, found through its ssa_meta.json, or --tokenizer).
"""


def build_parser() -> argparse.ArgumentParser:
    from ssa_megatron.console import make_parser
    p = make_parser(description=__doc__, epilog=USAGE)
    p.add_argument("--checkpoint", required=True, help="--save directory (its 'latest') or a tag dir")
    p.add_argument("--tag", default=None, help="checkpoint tag inside --checkpoint (default: latest)")
    src = p.add_argument_group("evaluation data (one of)")
    src.add_argument("--data-path", default=None,
                     help=".bin/.idx prefix (tools/preprocess_data.py); without it and --text: the "
                          "dataset the checkpoint trained on, when it is one prefix on this machine")
    src.add_argument("--text", nargs="+", default=None, help="raw .txt / .jsonl files (or dirs)")
    src.add_argument("--json-keys", nargs="+", default=["text"])
    src.add_argument("--split", default=None,
                     help="train,valid,test weights of --data-path (default: the checkpoint's --split)")
    src.add_argument("--split-name", default="valid", choices=["train", "valid", "test", "all"])
    src.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    ev = p.add_argument_group("perplexity")
    ev.add_argument("--seq-length", type=int, nargs="+", default=None,
                    help="context lengths (default: the training length)")
    ev.add_argument("--rope-scaling-factor", default=None,
                    help="llama3-style RoPE factor for lengths beyond training: a number or 'auto'")
    ev.add_argument("--stride", type=int, default=None,
                    help="sliding-window evaluation: windows advance by this many tokens and score "
                         "only their last STRIDE tokens (default: non-overlapping windows)")
    ev.add_argument("--max-windows", type=int, default=64, help="windows per length (all ranks)")
    ev.add_argument("--micro-batch-size", type=int, default=1, help="windows per forward")
    ev.add_argument("--modes", nargs="+", default=["full", "sparse"], choices=["full", "sparse"])
    ev.add_argument("--block-counts", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ev.add_argument("--dense-layers", type=int, nargs="+", default=[], metavar="N",
                    help="also evaluate sparse mode with the first N attention layers in full "
                         "attention (mode 'sparse+denseN'), for each N")
    ev.add_argument("--selections", nargs="+", default=[], metavar="NAME",
                    help="also evaluate sparse mode with other block selections (mode "
                         "'sparse@NAME'): oracle (the blocks holding the most full-attention mass: "
                         "no selection of k blocks keeps more of it), recentN (the min(N, k) most "
                         "recent blocks always kept, the rest by the model's own score), mean (the "
                         "paper's score), moment2 (the mean score plus each block's per-channel key "
                         "variance term: a second-order estimate of its attention share), quest "
                         "(the per-channel key bound of Quest), subN (each block scored from the "
                         "means of N sub-blocks: sub1 is the paper's score, N = block size the "
                         "attention's own block share)")
    ev.add_argument("--reset-attention-mask", choices=["auto", "on", "off"], default="auto",
                    help="keep documents apart inside a window (auto: as the checkpoint trained)")
    an = p.add_argument_group("attention sparsity / alignment gap")
    an.add_argument("--sparsity-windows", type=int, default=4, help="0 skips the analysis")
    an.add_argument("--sparsity-length", type=int, default=None, help="default: first --seq-length")
    an.add_argument("--no-alignment-gap", action="store_true")
    nd = p.add_argument_group("needle in a haystack")
    nd.add_argument("--needle-trials", type=int, default=2, help="samples per length and depth; 0 skips")
    nd.add_argument("--needle-lengths", type=int, nargs="+", default=None, help="default: --seq-length")
    nd.add_argument("--needle-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    nd.add_argument("--needle-block-counts", type=int, nargs="+", default=None,
                    help="sparse budgets for the needle test (default: the training block_counts)")
    rt = p.add_argument_group("runtime and output")
    rt.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    rt.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    rt.add_argument("--attention-backend", default=None, choices=["auto", "triton", "reference"])
    rt.add_argument("--seed", type=int, default=1234)
    rt.add_argument("--json", default=None, help="write the results here")
    rt.add_argument("--plot", default=None, help="PNG: perplexity vs block_counts, dropped mass per layer")
    rt.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _find_tokenizer(explicit: Optional[str], meta: dict, data_path: Optional[str]):
    from ssa_megatron.data.metadata import dataset_tokenizer_file
    from ssa_megatron.data.tokenizer import build_tokenizer
    candidates: List[str] = []
    if explicit:
        return build_tokenizer(explicit)
    tok = (meta.get("data") or {}).get("tokenizer") or {}
    if tok.get("path"):
        candidates.append(tok["path"])
    prefixes = [data_path] if data_path else []
    prefixes += [x for x in ((meta.get("data") or {}).get("data_path") or [])
                 if not _is_number(x)]
    for prefix in prefixes:
        try:
            f = dataset_tokenizer_file(prefix)
        except (OSError, ValueError, KeyError):  # no readable record beside the data: other candidates
            f = None
        if f:
            candidates.append(f)
    for c in candidates:
        if c and os.path.isfile(c):
            return build_tokenizer(c)
    return None


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass
class Evaluation:
    """What the steps of :func:`run` share: the flags, the model and its shape, the data."""

    args: argparse.Namespace
    model: torch.nn.Module
    shape: dict
    meta: dict
    rank: int
    world: int
    lengths: List[int]
    needle_lengths: List[int]
    notes: List[str]
    started: float  # time.time() once torch.distributed is up
    tokenizer: object = None
    stream: object = None
    eod: Optional[int] = None
    reset: bool = False
    source: Optional[dict] = None

    @property
    def train_len(self) -> int:
        return self.shape["train_seq_length"]

    @property
    def ssa_layers(self) -> bool:
        """Layers with a full/sparse switch (not NSA, not megatron's stock layer)."""
        return self.shape["layer_spec"] == "ssa" and self.shape["attention_mode"] != "nsa"

    def progress(self, items, desc):
        if self.args.quiet or self.rank != 0:
            return items
        from tqdm import tqdm
        return tqdm(items, desc=desc, leave=False, file=sys.stderr)

    def rope_factor(self, length: int) -> Optional[float]:
        factor = self.args.rope_scaling_factor
        if length <= self.train_len or factor is None:
            return None
        if factor == "auto":
            return length / self.train_len
        try:
            return float(factor)
        except ValueError:
            from ssa_megatron.eval.model import EvalError
            raise EvalError(f"--rope-scaling-factor {factor!r}: a number or auto") from None


def run(args) -> dict:
    """Perplexity, sparsity / alignment gap and needle retrieval of ``args.checkpoint``, with
    the attention backend ``--attention-backend`` names."""
    from ssa_megatron.ops import dispatch
    check_inputs(args)
    with dispatch.attention_backend(args.attention_backend or None):
        return _evaluate(args)


def _evaluate(args) -> dict:
    ev = load_evaluation(args)
    read_evaluation_data(ev)
    result = {"checkpoint": os.path.abspath(args.checkpoint), "iteration": ev.meta.get("iteration"),
              "attention_mode": ev.shape["attention_mode"], "block_size": ev.shape["ssa_block_size"],
              "train_block_counts": ev.shape["ssa_block_counts"], "train_seq_length": ev.train_len,
              "name": f"{os.path.basename(os.path.abspath(args.checkpoint))} "
                      f"({ev.shape['attention_mode']}, iter {ev.meta.get('iteration')})",
              "source": ev.source, "stream_tokens": int(len(ev.stream)), "bf16": bool(args.bf16),
              "world_size": ev.world, "stride": args.stride, "reset_attention_mask": bool(ev.reset),
              "perplexity": evaluate_perplexities(ev), "notes": ev.notes}
    if ev.ssa_layers and args.sparsity_windows > 0:
        result["sparsity"] = evaluate_sparsity(ev)
    if args.needle_trials > 0:
        if ev.tokenizer is None:
            ev.notes.append("needle test skipped: no tokenizer found (pass --tokenizer)")
        else:
            result["needle"] = evaluate_needles(ev)
    result["seconds"] = round(time.time() - ev.started, 2)
    return result


def trained_data_path(checkpoint: str, tag: Optional[str] = None) -> list:
    """The --data-path the checkpoint trained on (a list: one prefix, or weight/prefix pairs of
    a blend), [] when it does not say."""
    from ssa_megatron.training.checkpoint_format import CheckpointError, read_latest, read_meta
    tag = tag or (read_latest(checkpoint) if os.path.isdir(checkpoint) else None)
    for tag_dir in ([os.path.join(checkpoint, tag)] if tag else []) + [checkpoint]:
        try:
            return list((read_meta(tag_dir).get("data") or {}).get("data_path") or [])
        except CheckpointError:
            continue
    return []


def check_inputs(args) -> None:
    """Flags that cannot work end here, before the model loads (a wrong path fails at once)."""
    from ssa_megatron.eval.model import EvalError
    if args.data_path is None and args.text is None:
        trained = trained_data_path(args.checkpoint, args.tag)
        if len(trained) == 1 and os.path.isfile(trained[0] + ".idx"):
            args.data_path, args.data_path_from_checkpoint = trained[0], True
        else:
            where = (f" (the checkpoint trained on {' '.join(trained)}, "
                     f"{'a blend' if len(trained) > 1 else 'not on this machine'})" if trained else "")
            raise EvalError(f"pass one source of evaluation data: --data-path PREFIX or --text FILES{where}")
    if args.data_path is not None and args.text is not None:
        raise EvalError("pass one source of evaluation data: --data-path PREFIX or --text FILES, not both")
    if args.micro_batch_size < 1 or args.max_windows < 1:
        raise EvalError("--micro-batch-size and --max-windows must be positive")
    if any(n < 1 for n in args.dense_layers) or (args.dense_layers and "sparse" not in args.modes):
        raise EvalError("--dense-layers takes layer counts >= 1 and needs sparse in --modes")
    if args.selections and "sparse" not in args.modes:
        raise EvalError("--selections needs sparse in --modes")
    from ssa_megatron.ops.selection_variants import selection_names_error
    unknown = selection_names_error(args.selections)
    if unknown:
        raise EvalError(f"--selections: {unknown}")
    if args.text:
        from ssa_megatron.data.corpus import CorpusError, expand_inputs
        try:
            expand_inputs(list(args.text), flag="--text")
        except CorpusError as e:
            raise EvalError(str(e)) from None


def load_evaluation(args) -> Evaluation:
    """torch.distributed, the checkpoint's model (long enough for every length asked for) and
    its tokenizer."""
    import torch.distributed as dist

    from ssa_megatron.eval.model import init_single_process_or_dp, load_model
    init_single_process_or_dp(args.seed)
    started = time.time()
    lengths = list(args.seq_length or [])
    needle_lengths = list(args.needle_lengths or [])
    max_len = max(lengths + needle_lengths + [0]) + 16
    model, shape, meta = load_model(args.checkpoint, args.tag, args.device, args.bf16, max_len)
    lengths = lengths or [shape["train_seq_length"]]
    ev = Evaluation(args=args, model=model, shape=shape, meta=meta, rank=dist.get_rank(),
                    world=dist.get_world_size(), lengths=lengths,
                    needle_lengths=needle_lengths or lengths, notes=[], started=started)
    if not ev.ssa_layers:
        ev.notes.append(f"attention mode {shape['attention_mode']} / layer spec {shape['layer_spec']}: "
                        "no full/sparse switch; evaluated in its natural mode, no sparsity analysis")
    ev.reset = {"auto": shape["reset_attention_mask"], "on": True,
                "off": False}[args.reset_attention_mask]
    if ev.reset and shape["layer_spec"] != "ssa":
        from ssa_megatron.eval.model import EvalError
        raise EvalError(f"--reset-attention-mask on: layer spec {shape['layer_spec']} attends across "
                        "documents (megatron's local attention takes no document boundaries); "
                        "use --reset-attention-mask off")
    ev.tokenizer = _find_tokenizer(args.tokenizer, meta, args.data_path)
    return ev


def read_evaluation_data(ev: Evaluation) -> None:
    """The token stream to evaluate (a split of --data-path, or --text tokenised), its
    end-of-document id, and notes on how held out it is."""
    from ssa_megatron.eval import data as evdata
    from ssa_megatron.eval.model import EvalError
    args, meta = ev.args, ev.meta
    if args.data_path:
        split = args.split or meta["args"].get("split") or "969,30,1"
        ev.stream = evdata.indexed_stream(args.data_path, split, args.split_name)
        from ssa_megatron.data.datasets import read_tokenizer_info
        try:
            data_tokenizer = read_tokenizer_info([args.data_path], None)
        except (OSError, ValueError, KeyError):  # data without a tokenizer record: the checkpoint's
            data_tokenizer = None
            ev.eod = ev.tokenizer.eod if ev.tokenizer is not None else None
        else:
            ev.eod = data_tokenizer.eod
            from ssa_megatron.data.tokenizer import tokenizers_differ
            trained = (meta.get("data") or {}).get("tokenizer")
            given = data_tokenizer.description
            if tokenizers_differ(trained, given):
                ev.notes.append(f"{args.data_path} was tokenized with another tokenizer (sha256 "
                                f"{given['sha256'][:12]}) than the checkpoint was trained with "
                                f"({trained['sha256'][:12]}): the perplexities are not comparable")
        ev.source = {"data_path": args.data_path, "split": split, "split_name": args.split_name}
        if getattr(args, "data_path_from_checkpoint", False):
            ev.notes.append(f"--data-path {args.data_path}: the data the checkpoint trained on")
        trained_split = meta["args"].get("split")
        index = {"train": 0, "valid": 1, "test": 2}.get(args.split_name)
        if args.split_name == "train":
            ev.notes.append("evaluating on the training split")
        elif trained_split and index is not None:
            from ssa_megatron.data.datasets import split_bounds
            weights, _ = split_bounds(trained_split)
            if split != trained_split:
                ev.notes.append(f"--split {split} differs from the training split {trained_split}: the "
                                f"'{args.split_name}' documents may overlap the training documents")
            elif weights[index] == 0:
                ev.notes.append(f"the training split {trained_split} has no '{args.split_name}' share: "
                                "these documents are not held out")
    else:
        if ev.tokenizer is None:
            raise EvalError("--text needs the checkpoint's tokenizer: none was found through its "
                            "ssa_meta.json; pass --tokenizer PATH")
        need = max(ev.lengths) * args.max_windows + 1
        # documents begin as the training data's did (recorded since --bos), else as the
        # tokenizer's own prefix says
        recorded = ((meta.get("data") or {}).get("tokenizer") or {}).get("bos")
        ev.stream = evdata.text_stream(args.text, ev.tokenizer, args.json_keys, max_tokens=need * 4,
                                       prefix=None if args.tokenizer else recorded)
        ev.eod = ev.tokenizer.eod
        ev.source = {"text": list(args.text), "json_keys": list(args.json_keys)}
    if ev.reset and ev.eod is None:
        raise EvalError("--reset-attention-mask needs the end-of-document id; pass --tokenizer")


def evaluate_perplexities(ev: Evaluation) -> List[dict]:
    """Perplexity of every length x mode x block budget (one record each)."""
    from ssa_megatron.eval import data as evdata
    from ssa_megatron.eval.model import EvalError, set_rope_scaling
    from ssa_megatron.eval.perplexity import evaluate_perplexity, reduce_perplexity, settings_for
    args, bs = ev.args, ev.shape["ssa_block_size"]
    layers = ev.shape.get("num_layers")
    if layers and any(n > layers for n in args.dense_layers):
        raise EvalError(f"--dense-layers {max(args.dense_layers)}: the model has {layers} layers")
    if args.dense_layers and not ev.ssa_layers:
        ev.notes.append("--dense-layers ignored: the model has no full/sparse switch")
    if args.selections and not ev.ssa_layers:
        ev.notes.append("--selections ignored: the model has no full/sparse switch")
    from ssa_megatron.ops.selection_variants import selection_names_error
    unfit = selection_names_error(args.selections, bs)
    if unfit and ev.ssa_layers:
        raise EvalError(f"--selections {unfit}")
    settings = settings_for(list(args.modes) if ev.ssa_layers else ["natural"], args.block_counts,
                            args.dense_layers, args.selections)
    records = []
    for length in ev.lengths:
        windows = evdata.make_windows(len(ev.stream), length, args.stride, args.max_windows)
        if not windows:
            raise EvalError(f"the evaluation data ({len(ev.stream)} tokens) is shorter than one window "
                            f"of --seq-length {length} + 1; use more data or a shorter length")
        if length % bs:
            ev.notes.append(f"length {length} is not a multiple of the block size {bs}")
        factor = ev.rope_factor(length)
        set_rope_scaling(ev.model, factor, ev.train_len)
        sums = evaluate_perplexity(ev.model, ev.stream, evdata.shard(windows, ev.rank, ev.world), length,
                                   settings, args.micro_batch_size, ev.eod if ev.reset else None,
                                   progress=lambda it: ev.progress(it, f"perplexity L={length}"),
                                   vocab_size=ev.shape["vocab_size"])
        for (mode, bc), r in reduce_perplexity(sums).items():
            records.append({"seq_length": length, "rope_scaling_factor": factor,
                            "mode": mode, "block_counts": bc, "windows": len(windows), **r})
    set_rope_scaling(ev.model, None, ev.train_len)
    return records


def evaluate_sparsity(ev: Evaluation) -> dict:
    """Attention sparsity and the alignment gap on the first windows, in full mode."""
    from ssa_megatron.eval import data as evdata
    from ssa_megatron.eval.model import set_rope_scaling
    from ssa_megatron.eval.perplexity import all_reduce_sums
    from ssa_megatron.eval.sparsity import SparsityCollector
    from ssa_megatron.model.attention import set_inference_mode
    args, model = ev.args, ev.model
    length = args.sparsity_length or ev.lengths[0]
    windows = evdata.make_windows(len(ev.stream), length, None, args.sparsity_windows)
    set_rope_scaling(model, ev.rope_factor(length), ev.train_len)
    collector = SparsityCollector(model, args.block_counts, gap=not args.no_alignment_gap)
    set_inference_mode(model, "full")
    mine = evdata.shard(windows, ev.rank, ev.world)
    try:
        collector.enabled = True
        for w in ev.progress(mine, f"sparsity L={length}"):
            tokens, _, _ = evdata.batch_windows(ev.stream, [w], length)
            dev = next(model.parameters()).device
            with torch.no_grad():
                model(tokens.to(dev), torch.arange(length, device=dev)[None], None)
    finally:
        collector.enabled = False
        collector.close()
    summary = collector.summarize(all_reduce_sums(collector.flat()))
    set_rope_scaling(model, None, ev.train_len)
    return {"seq_length": length, "windows": len(windows), **summary}


def evaluate_needles(ev: Evaluation) -> dict:
    """Needle-in-a-haystack accuracy per length, setting and depth (all ranks summed)."""
    from ssa_megatron.eval import data as evdata
    from ssa_megatron.eval.model import set_rope_scaling
    from ssa_megatron.eval.needle import make_needle_set, model_next_token, needle_accuracy
    from ssa_megatron.eval.perplexity import all_reduce_sums, apply_setting
    args, model, needle_lengths = ev.args, ev.model, ev.needle_lengths
    samples = make_needle_set(ev.tokenizer, needle_lengths, args.needle_depths, args.needle_trials,
                              seed=args.seed)
    nsettings = [("full", None)] + [("sparse", bc) for bc in
                                    (args.needle_block_counts or [ev.shape["ssa_block_counts"]])]
    if not ev.ssa_layers:
        nsettings = [("natural", None)]
    depths = sorted(set(args.needle_depths))
    keys = [(L, s, d) for L in needle_lengths for s in nsettings for d in depths]
    acc = torch.zeros(len(keys), 2, dtype=torch.float64)
    records = []
    vocab = ev.shape["vocab_size"]
    for setting in nsettings:
        apply_setting(model, setting)
        for L in needle_lengths:
            set_rope_scaling(model, ev.rope_factor(L), ev.train_len)
            mine = evdata.shard([s for s in samples if len(s.tokens) == L], ev.rank, ev.world)
            recs = needle_accuracy(mine, ev.tokenizer, model_next_token(model, vocab),
                                   args.micro_batch_size)
            for r in recs:
                i = keys.index((L, setting, r["depth"]))
                acc[i, 0] += r["score"]
                acc[i, 1] += 1
                records.append(dict(r, mode=setting[0], block_counts=setting[1]))
    set_rope_scaling(model, None, ev.train_len)
    acc = all_reduce_sums(acc)
    summary = [{"length": L, "mode": s[0], "block_counts": s[1], "depth": d,
                "accuracy": float(a / n) if n else float("nan"), "samples": int(n)}
               for (L, s, d), (a, n) in zip(keys, acc.tolist())]
    return {"depths": depths, "lengths": needle_lengths, "summary": summary,
            "records_rank0": records}


def main(argv: Optional[List[str]] = None) -> int:
    from ssa_megatron.errors import ConfigError
    from ssa_megatron.eval.report import format_table, write_json, write_plot
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib: pip install matplotlib (or pip install -e .[plots])",
                  file=sys.stderr)
            return 2
    try:
        result = run(args)
    except ConfigError as e:  # EvalError, a tokenizer's CorpusError, a checkpoint's error
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist
    if dist.get_rank() == 0:
        print(format_table(result))
        for n in result["notes"]:
            print(f"note: {n}")
        if args.json:
            write_json(result, args.json)
            print(f"wrote {args.json}")
        if args.plot:
            write_plot(result, args.plot)
            print(f"wrote {args.plot}")
    from ssa_megatron.training.distributed import destroy_distributed
    destroy_distributed()
    return 0
