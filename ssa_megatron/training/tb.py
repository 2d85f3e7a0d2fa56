"""One log line per interval on stdout, the same scalars in TensorBoard."""
from __future__ import annotations

import math


class TrainLogger:
    """``first_step``: the first iteration this run trains. TensorBoard hides the events an
    interrupted earlier run wrote from that step on (its ``purge_step``), so a resumed run's
    curves show each step once; a run with nothing to train opens no event file."""

    def __init__(self, args, is_writer: bool, first_step: int = 1):
        self.args = args
        self.is_writer = is_writer
        self.writer = None
        if is_writer and args.tensorboard_dir and first_step <= args.train_iters:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, purge_step=first_step)

    def log_train(self, iteration, lm_loss, align_loss, per_layer, lr, grad_norm, tokens_per_s,
                  tflops, consumed, ms_per_iter, select_loss=float("nan")):
        if not self.is_writer:
            return
        coef = self.args.ssa_align_coef if self.args.attention_mode == "ssa" else 0.0
        align_txt = "" if math.isnan(align_loss) else f" | align loss {align_loss:.4e}"
        if not math.isnan(select_loss):
            align_txt += f" | select loss {select_loss:.4e}"
        print(f" iteration {iteration:>7d}/{self.args.train_iters} | consumed samples {consumed:>9d}"
              f" | {ms_per_iter:8.1f} ms/iter | lm loss {lm_loss:.4f}{align_txt} | lr {lr:.3e}"
              f" | grad norm {grad_norm:.3f} | tokens/s {tokens_per_s:,.0f}"
              f" | TFLOP/s/GPU {tflops:.2f}", flush=True)
        if self.writer is None:
            return
        w = self.writer
        w.add_scalar("train/lm_loss", lm_loss, iteration)
        if not math.isnan(align_loss):
            w.add_scalar("train/align_loss", align_loss, iteration)
            w.add_scalar("train/total_loss", lm_loss + coef * align_loss, iteration)
            for i, v in enumerate(per_layer.tolist()):
                if not math.isnan(v):
                    w.add_scalar(f"align_loss_per_layer/layer_{i + 1:02d}", v, iteration)
        if not math.isnan(select_loss):
            w.add_scalar("train/select_loss", select_loss, iteration)
        w.add_scalar("train/lr", lr, iteration)
        w.add_scalar("train/grad_norm", grad_norm, iteration)
        w.add_scalar("throughput/tokens_per_s", tokens_per_s, iteration)
        w.add_scalar("throughput/tflops_per_gpu", tflops, iteration)
        w.flush()

    def log_eval(self, iteration, loss, mode=None):
        if not self.is_writer:
            return
        label = f" ({mode})" if mode else ""
        print(f" validation at iteration {iteration}{label} | lm loss {loss:.4f} | "
              f"ppl {math.exp(min(loss, 50)):.2f}", flush=True)
        if self.writer is not None:
            suffix = f"_{mode.replace(':', '_k')}" if mode else ""
            self.writer.add_scalar(f"valid/lm_loss{suffix}", loss, iteration)
            self.writer.add_scalar(f"valid/ppl{suffix}", math.exp(min(loss, 50)), iteration)
            self.writer.flush()

    def log_diagnostics(self, iteration, record):
        """Per-layer head means of the attention diagnostics (model/diagnostics.py) and the
        update norms per parameter group."""
        if self.writer is None:
            return
        for layer in record.get("layers", []):
            for key, value in layer.items():
                if key == "layer":
                    continue
                mean = sum(value) / len(value) if isinstance(value, list) else value
                self.writer.add_scalar(f"diagnostics/{key}/layer_{layer['layer']:02d}", mean, iteration)
        for group, value in record.get("update_norms", {}).items():
            self.writer.add_scalar(f"update_norm/{group}", value, iteration)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
