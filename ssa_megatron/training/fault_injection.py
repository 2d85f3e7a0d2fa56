"""Fault injection for run safety (docs/RELIABILITY.md): ``kill -9`` a training run at random
moments (inside saves included), rerun the same command, and check that

* after every kill, ``latest`` names an intact checkpoint and every ``iter_N`` directory verifies
  against its manifest (no complete checkpoint lost or damaged: bytes lost 0), and
* the final weights and optimizer state equal an uninterrupted run's bit for bit (CPU, fp32).

Every run is a real process, forked from this one after the heavy imports (torch, DeepSpeed,
megatron-core are already loaded, which saves the ~10 s of start-up a fresh interpreter pays); the
child sets up its own process group and runs ``pretrain.main(argv)`` exactly as
``python -m ssa_megatron.training.pretrain`` does, with its output in a log file.

    python tools/fault_injection.py --trials 30 --workdir /tmp/fi    # see --help
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import sys
import time
import traceback
from typing import Dict, List, Optional

TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
              "--num-attention-heads", "8", "--num-query-groups", "2", "--seq-length", "64",
              "--ssa-block-counts", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--lr", "5e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--split", "100,0,0",
              "--num-workers", "0"]


class Child:
    """A forked run of ``pretrain.main``; ``events`` is a pipe it writes b"s"/b"e" to at the start and
    end of each checkpoint save (when asked to)."""

    def __init__(self, pid: int, log: str, events: Optional[int]):
        self.pid, self.log, self.events = pid, log, events
        self.code: Optional[int] = None

    def poll(self) -> Optional[int]:
        """The exit code once the child has ended (reaping it), else None."""
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 600) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"run {self.pid} did not finish in {timeout} s; log {self.log}")
            time.sleep(0.02)
        if self.events is not None:
            os.close(self.events)
            self.events = None
        return self.code

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def preload() -> None:
    """Import what a training run imports, once, in the parent (each fork then starts warm)."""
    import deepspeed  # noqa: F401
    import megatron.core.datasets.gpt_dataset  # noqa: F401
    from megatron.core import parallel_state  # noqa: F401

    import ssa_megatron.data.datasets  # noqa: F401
    import ssa_megatron.model.builder  # noqa: F401
    import ssa_megatron.training.distributed  # noqa: F401
    import ssa_megatron.training.pretrain  # noqa: F401
    import ssa_megatron.training.tb  # noqa: F401


def fork_main(argv: List[str], log: str, report_saves: bool = False, setup=None) -> Child:
    """Run ``pretrain.main(argv)`` in a forked child (one process, WORLD_SIZE 1) writing to ``log``.
    ``setup()`` runs first in the child (tests patch things there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe() if report_saves else (None, None)
    pid = os.fork()
    if pid:
        if write_end is not None:
            os.close(write_end)
        return Child(pid, log, read_end)
    code = 1
    try:
        if read_end is not None:
            os.close(read_end)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if write_end is not None:
            from ssa_megatron.training import checkpointing
            save = checkpointing.save_checkpoint

            def reporting_save(*a, **kw):
                os.write(write_end, b"s")
                tag = save(*a, **kw)
                os.write(write_end, b"e")
                return tag
            checkpointing.save_checkpoint = reporting_save
        if setup is not None:
            setup()
        from ssa_megatron.training.pretrain import main
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        import atexit
        atexit._run_exitfuncs()  # what interpreter exit would run (e.g. the save-dir lock's release)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _tensors(obj, prefix: str = "") -> Dict[str, object]:
    import torch
    out: Dict[str, object] = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def checkpoint_state(tag_dir: str) -> Dict[str, object]:
    """Every tensor of a checkpoint's DeepSpeed files (weights and optimizer state), by path."""
    import torch
    state: Dict[str, object] = {}
    for name in sorted(os.listdir(tag_dir)):
        if name.endswith("_states.pt"):
            state.update(_tensors(torch.load(os.path.join(tag_dir, name), map_location="cpu",
                                             weights_only=False), name))
    return state


def bitwise_equal(a: Dict[str, object], b: Dict[str, object]) -> Optional[str]:
    """None if both hold the same tensors bit for bit, else the first difference."""
    import torch
    if a.keys() != b.keys():
        return f"different entries: {sorted(a.keys() ^ b.keys())[:3]}"
    for key in a:
        x, y = a[key].contiguous(), b[key].contiguous()
        same = x.dtype == y.dtype and x.shape == y.shape and (
            x.numel() == 0 or torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))
        if not same:
            return f"{key} differs"
    return None


def check_save_dir(save_dir: str) -> List[str]:
    """Problems of a save directory after a crash: each iter_N must verify, latest must name one."""
    from ssa_megatron.training.checkpoint_format import LATEST, list_tags, read_latest, verify_checkpoint
    problems = []
    tags = list_tags(save_dir)
    for tag in tags:
        problem, _ = verify_checkpoint(os.path.join(save_dir, tag))
        if problem:
            problems.append(f"{tag}: {problem}")
    if os.path.isfile(os.path.join(save_dir, LATEST)) and read_latest(save_dir) not in tags:
        problems.append(f"latest names {read_latest(save_dir)!r}, not a checkpoint")
    return problems


def _dir_bytes(save_dir: str, tags: List[str]) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for tag in tags
               for root, _, files in os.walk(os.path.join(save_dir, tag)) for f in files)


def _wait_events(child: Child, count: int, timeout: float) -> List[float]:
    """Times (time.time()) of the next ``count`` save events of ``child``, fewer if it ends first."""
    times: List[float] = []
    deadline = time.time() + timeout
    while len(times) < count and time.time() < deadline:
        ready, _, _ = select.select([child.events], [], [], 0.05)
        if ready:
            data = os.read(child.events, 1)
            if not data:
                break
            times.append(time.time())
    return times


def _drain(child: Child) -> bytes:
    """Every save event the (ended) child wrote and nobody read yet."""
    out = b""
    while child.events is not None:
        chunk = os.read(child.events, 64)
        if not chunk:
            break
        out += chunk
    return out


def _intact_bytes(save_dir: str, tag: str) -> int:
    """Bytes of ``tag`` (or of its renamed ``tag.replaced-*`` copy) that still verify, else 0."""
    from ssa_megatron.training.checkpoint_format import verify_checkpoint
    names = [tag] + sorted(n for n in os.listdir(save_dir) if n.startswith(tag + ".replaced-"))
    for name in names:
        path = os.path.join(save_dir, name)
        if os.path.isdir(path) and verify_checkpoint(path)[0] is None:
            return _dir_bytes(save_dir, [name])
    return 0


def write_random_corpus(prefix: str, num_docs: int = 300, vocab_size: int = 256, seed: int = 0) -> str:
    """A small .bin/.idx corpus of random documents (EOD = vocab_size - 1) with its tokenizer record."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from ssa_megatron.data.metadata import write_synthetic_record
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    tokens = 0
    for _ in range(num_docs):
        doc = rng.integers(0, vocab_size - 1, int(rng.integers(20, 300)))
        builder.add_document(torch.tensor(np.append(doc, vocab_size - 1), dtype=torch.int64), [len(doc) + 1])
        tokens += len(doc) + 1
    builder.finalize(prefix + ".idx")
    write_synthetic_record(prefix, vocab_size, vocab_size - 1, num_docs, tokens)
    return prefix


WORKDIR_MARK = ".ssa_fault_injection"  # a workdir this tool made: its runs there may be replaced


def claim_workdir(workdir: str) -> None:
    """Make ``workdir`` this tool's, or refuse (ValueError, one line) one that holds files it did
    not create: the trials delete and rewrite their run folders there."""
    mark = os.path.join(workdir, WORKDIR_MARK)
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.exists(mark):
        raise ValueError(f"--workdir {workdir} holds files fault injection did not create (its trials "
                         "delete and rewrite folders there); give a new or empty directory")
    os.makedirs(workdir, exist_ok=True)
    open(mark, "a").close()


def run_trials(trials: int, workdir: str, data_prefix: str, train_iters: int = 12,
               save_interval: int = 2, seed: int = 0, zero_stage: int = 1, log=print) -> dict:
    """The kill -9 loop. Returns the counts docs/RELIABILITY.md records (raises on a failure).
    Even trials kill at a random moment of a random save, odd ones at a random moment of the run."""
    import torch

    from ssa_megatron.training.checkpoint_format import list_tags
    torch.set_num_threads(1)  # no intra-op threads in the parent: forking stays safe
    preload()
    rng = random.Random(seed)
    from ssa_megatron.checkout import checkout_root
    root = checkout_root()
    flags = TINY_MODEL + ["--data-path", data_prefix, "--train-iters", str(train_iters),
                          "--save-interval", str(save_interval), "--zero-stage", str(zero_stage),
                          "--deepspeed-config", os.path.join(root, "examples", "ds_zero1.json")]
    claim_workdir(workdir)
    final = f"iter_{train_iters:07d}"
    saves = train_iters // save_interval

    ref_dir = os.path.join(workdir, "reference")
    shutil.rmtree(ref_dir, ignore_errors=True)
    t0 = time.time()
    ref = fork_main(flags + ["--save", ref_dir], os.path.join(workdir, "reference.log"), report_saves=True)
    events = _wait_events(ref, 2 * saves, timeout=600)
    if ref.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{ref.output()[-3000:]}")
    run_time = time.time() - t0
    save_times = [e - s for s, e in zip(events[0::2], events[1::2])]
    reference = checkpoint_state(os.path.join(ref_dir, final))
    counts = {"trials": 0, "killed": 0, "killed_inside_save": 0, "finished_before_kill": 0,
              "reruns_resumed": 0, "reruns_started_fresh": 0, "stale_locks_taken_over": 0,
              "final_state_bitwise_equal": 0, "checkpoints_verified_after_kill": 0,
              "damaged_after_kill": 0, "bytes_lost": 0, "run_seconds": round(run_time, 2),
              "save_seconds_max": round(max(save_times), 3)}
    for trial in range(trials):
        save_dir = os.path.join(workdir, f"trial{trial:03d}")
        shutil.rmtree(save_dir, ignore_errors=True)
        child = fork_main(flags + ["--save", save_dir], os.path.join(workdir, f"trial{trial:03d}.kill.log"),
                          report_saves=True)
        seen = b""
        if trial % 2 == 0:  # a random moment of a random save
            nth = rng.randint(1, saves)
            got = _wait_events(child, 2 * (nth - 1) + 1, timeout=600)
            seen = b"x" * len(got)
            time.sleep(rng.uniform(0, min(save_times)))
        else:
            time.sleep(rng.uniform(0, run_time))
        child.signal(signal.SIGKILL)
        pending = _drain(child) if child.events is not None else b""
        code = child.wait()
        counts["trials"] += 1
        events_total = len(seen) + len(pending)
        if code == -signal.SIGKILL:
            counts["killed"] += 1
            counts["killed_inside_save"] += events_total % 2  # a save began and did not end
        elif code == 0:
            counts["finished_before_kill"] += 1
        else:
            raise RuntimeError(f"trial {trial}: the run failed (exit {code}):\n{child.output()[-3000:]}")
        before = list_tags(save_dir)
        problems = check_save_dir(save_dir) if os.path.isdir(save_dir) else []
        counts["checkpoints_verified_after_kill"] += len(before)
        if problems:
            counts["damaged_after_kill"] += len(problems)
            raise RuntimeError(f"trial {trial}: after kill -9: {problems}")
        sizes = {tag: _dir_bytes(save_dir, [tag]) for tag in before}
        rerun = fork_main(flags + ["--save", save_dir], os.path.join(workdir, f"trial{trial:03d}.rerun.log"))
        if rerun.wait() != 0:
            raise RuntimeError(f"trial {trial}: the rerun failed:\n{rerun.output()[-3000:]}")
        text = rerun.output()
        if "Traceback" in text:
            raise RuntimeError(f"trial {trial}: traceback in the rerun:\n{text[-3000:]}")
        resumed = "auto-resume:" in text
        if bool(before) != resumed:
            raise RuntimeError(f"trial {trial}: checkpoints before the rerun {before}, but the rerun "
                               f"{'resumed' if resumed else 'started fresh'}:\n{text[-2000:]}")
        counts["reruns_resumed" if resumed else "reruns_started_fresh"] += 1
        counts["stale_locks_taken_over"] += int("took over the lock" in text)
        lost = sum(sizes[tag] for tag in before if _intact_bytes(save_dir, tag) != sizes[tag])
        counts["bytes_lost"] += lost
        if lost:
            raise RuntimeError(f"trial {trial}: {lost} bytes of complete checkpoints were lost")
        diff = bitwise_equal(reference, checkpoint_state(os.path.join(save_dir, final)))
        if diff:
            raise RuntimeError(f"trial {trial}: final state differs from the uninterrupted run: {diff}")
        counts["final_state_bitwise_equal"] += 1
        what = ("killed inside a save" if code and events_total % 2 else "killed" if code
                else "finished before the kill")
        log(f"trial {trial + 1}/{trials}: {what}; rerun {'resumed from ' + before[-1] if before else 'started fresh'};"
            " final state bitwise equal")
        shutil.rmtree(save_dir, ignore_errors=True)
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data-path", default=None, help="a .bin/.idx prefix (default: a random corpus)")
    p.add_argument("--train-iters", type=int, default=12)
    p.add_argument("--save-interval", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the counts here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("SSA_ATTENTION_BACKEND", "reference")
    try:
        claim_workdir(args.workdir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = args.data_path
    if data is None:
        data = write_random_corpus(os.path.join(args.workdir, "data", "random"))
    started = time.time()
    counts = run_trials(args.trials, args.workdir, data, args.train_iters, args.save_interval,
                        args.seed, args.zero_stage)
    counts["total_seconds"] = round(time.time() - started, 1)
    print(json.dumps(counts, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(counts, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
