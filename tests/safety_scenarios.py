"""Run-safety scenarios, run by tests/test_run_safety.py in ONE process:

    python tests/safety_scenarios.py OUT_DIR DATA_PREFIX

Every training run is a real process forked from this one after the heavy imports
(ssa_megatron/training/fault_injection.py: fork_main runs pretrain.main(argv) with its own log),
so a scenario pays milliseconds, not ~10 s, per run. Each scenario records facts (exit codes, log
lines, files) in OUT_DIR/results.json; the test file asserts on them. A scenario that raises
records its traceback instead, so the others still run.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # tests/test_run_safety.py puts ROOT and HERE on PYTHONPATH
os.environ.setdefault("SSA_ATTENTION_BACKEND", "reference")
os.environ["OMP_NUM_THREADS"] = "1"

from ssa_megatron.training import fault_injection as fi  # noqa: E402
from ssa_megatron.training import result_record  # noqa: E402

OUT = DATA = ""


def flags(save, iters, *extra, zero=1):
    return fi.TINY_MODEL + ["--data-path", DATA, "--train-iters", str(iters), "--save-interval", "2",
                            "--zero-stage", str(zero), "--deepspeed-config",
                            os.path.join(ROOT, "examples", "ds_zero1.json"),
                            *(["--save", save] if save else []), *extra]


def run(name, argv, setup=None, timeout=300):
    child = fi.fork_main(argv, os.path.join(OUT, f"{name}.log"), setup=setup)
    code = child.wait(timeout)
    return {"code": code, "log": child.output()}


def lines(text, word):
    return [ln for ln in text.splitlines() if word in ln]


def iterations(text):
    return [int(ln.split("/")[0].split()[-1]) for ln in text.splitlines() if ln.startswith(" iteration ")]


def tree(save):
    """Relative paths of everything under ``save`` with their sha256 (what a run must not touch)."""
    out = {}
    for root, _, files in os.walk(save):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, save)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def log_has(path, text):
    return os.path.isfile(path) and text in open(path, errors="replace").read()


def wait_for(predicate, timeout=120, poll=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


# --- issue case 1: a restart without --load -------------------------------------------------------
def restart_without_load():
    save = os.path.join(OUT, "case1")
    record = os.path.join(OUT, "case1_result.json")
    diag = ["--diagnostics-interval", "1"]
    first = run("case1_first", flags(save, 4, "--exit-interval", "2", "--result-json", record, *diag))
    before = tree(os.path.join(save, "iter_0000002"))
    again = run("case1_again", flags(save, 4, "--result-json", record, *diag))
    diagnosed = [json.loads(line)["iteration"] for line in open(os.path.join(save, "diagnostics.jsonl"))]
    after = tree(os.path.join(save, "iter_0000002"))
    done = run("case1_done", flags(save, 4, "--result-json", record))  # finished: says so, trains nothing
    records = {os.path.basename(p): json.load(open(p))["iterations"]
               for p in [*result_record.earlier_parts(record), record]}
    other = run("case1_other_load", flags(save, 4, "--load", os.path.join(OUT, "elsewhere")))
    over = run("case1_start_over", flags(save, 2, "--start-over"))
    aside = sorted(d for d in os.listdir(save) if d.startswith("set_aside_"))
    same = run("case1_start_over_same_load", flags(save, 2, "--start-over", "--load", save))
    return {"first": first["code"], "again": again["code"], "again_iterations": iterations(again["log"]),
            "again_autoresume": lines(again["log"], "auto-resume:"),
            "iter2_untouched": before == after and bool(before), "records": records,
            "diagnosed": diagnosed, "done": done["code"], "done_note": lines(done["log"], "nothing to train"),
            "done_built": lines(done["log"], "building the model"),
            "done_iterations": iterations(done["log"]),
            "latest": open(os.path.join(save, "latest")).read().strip(),
            "other": other["code"], "other_log": other["log"],
            "over": over["code"], "over_iterations": iterations(over["log"]),
            "over_note": lines(over["log"], "--start-over: moved"),
            "aside": {d: sorted(os.listdir(os.path.join(save, d))) for d in aside},
            "same": same["code"], "same_log": same["log"]}


# --- issue case 2: two runs into one --save directory ---------------------------------------------
def two_runs():
    save = os.path.join(OUT, "case2")
    a = fi.fork_main(flags(save, 2000, "--save-interval", "1000"), os.path.join(OUT, "case2_a.log"))
    ok = wait_for(lambda: os.path.isfile(os.path.join(save, "run.lock")) and log_has(a.log, " iteration "))
    b = run("case2_b", flags(save, 2000, "--save-interval", "1000"))
    a_alive = a.poll() is None
    a.signal(signal.SIGTERM)
    code_a = a.wait()
    out = {"a_started": ok, "b": b["code"], "b_log": b["log"], "a_alive_after_b": a_alive,
           "a": code_a, "a_saved": lines(a.output(), "stop signal: saved"),
           "latest": open(os.path.join(save, "latest")).read().strip(),
           "lock_left": os.path.exists(os.path.join(save, "run.lock"))}
    # a lock whose holder was killed (kill -9) is taken over by the next run on this host
    c = fi.fork_main(flags(save, 2000, "--save-interval", "1000"), os.path.join(OUT, "case2_c.log"))
    wait_for(lambda: log_has(c.log, " iteration "))
    c.signal(signal.SIGKILL)
    c.wait()
    out["lock_after_kill"] = os.path.exists(os.path.join(save, "run.lock"))
    d = run("case2_d", flags(save, 2000, "--save-interval", "1000", "--exit-interval", "1"))
    out["d"], out["d_takeover"] = d["code"], lines(d["log"], "took over the lock")
    return out


# --- issue case 3: a damaged checkpoint ----------------------------------------------------------
def damaged_checkpoint():
    save = os.path.join(OUT, "case3")
    made = run("case3_make", flags(save, 4))
    target = os.path.join(save, "iter_0000004", "mp_rank_00_model_states.pt")
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    explicit = run("case3_explicit", flags(save, 6, "--load-iteration", "4"))
    resumed = run("case3_resume", flags(save, 6))
    # every checkpoint damaged: refused in one line, nothing touched
    save2 = os.path.join(OUT, "case3_all")
    run("case3_make_all", flags(save2, 2, "--save-interval", "1"))
    for tag in ("iter_0000001", "iter_0000002"):
        os.remove(os.path.join(save2, tag, "ssa_meta.json"))
    before = tree(save2)
    none = run("case3_none", flags(save2, 4))
    return {"made": made["code"], "resume": resumed["code"], "resume_log": resumed["log"],
            "resume_iterations": iterations(resumed["log"]),
            "replaced": sorted(d for d in os.listdir(save) if ".replaced-" in d),
            "explicit": explicit["code"], "explicit_log": explicit["log"],
            "none": none["code"], "none_log": none["log"], "none_untouched": tree(save2) == before}


# --- issue case 4: Ctrl-C -------------------------------------------------------------------------
def ctrl_c():
    out = {}
    for name, presses in (("once", 1), ("twice", 2)):
        save = os.path.join(OUT, f"case4_{name}")
        child = fi.fork_main(flags(save, 2000, "--save-interval", "1000"), os.path.join(OUT, f"case4_{name}.log"))
        out[f"{name}_started"] = wait_for(lambda: log_has(child.log, " iteration "))
        t0 = time.time()
        child.signal(signal.SIGINT)
        if presses == 2:
            # the second press once the first is handled: two SIGINTs that arrive before Python
            # runs its handler (the main thread inside a long torch call) reach it as one
            wait_for(lambda: log_has(child.log, "Ctrl-C: saving"), timeout=60, poll=0.002)
            child.signal(signal.SIGINT)
        code = child.wait(120)
        out[name] = {"code": code, "seconds": time.time() - t0, "log": child.output(),
                     "latest": (open(os.path.join(save, "latest")).read().strip()
                                if os.path.isfile(os.path.join(save, "latest")) else None),
                     "lock_left": os.path.exists(os.path.join(save, "run.lock"))}
    # Ctrl-C while the model is still being built: one line, no traceback
    def interrupt_early():
        from ssa_megatron.training import pretrain
        build = pretrain.build_engine

        def build_then_interrupt(*a, **kw):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            return build(*a, **kw)
        pretrain.build_engine = build_then_interrupt
    early = run("case4_early", flags(os.path.join(OUT, "case4_early"), 4), setup=interrupt_early)
    out["early"] = {"code": early["code"], "log": early["log"]}
    return out


# --- non-finite loss ------------------------------------------------------------------------------
def nan_loss_at(steps):
    """setup(): make the loss of the first micro-batch of each iteration in ``steps`` NaN."""
    def setup():
        from ssa_megatron.training import pretrain
        lm_loss, calls = pretrain.lm_loss, {"n": 0}

        def poisoned(engine, batch, *args, **kwargs):
            loss = lm_loss(engine, batch, *args, **kwargs)
            iteration = calls["n"] // 2 + 1  # 2 micro-batches per iteration (global 4 = 2 x 2)
            calls["n"] += 1
            return loss * float("nan") if iteration in steps else loss
        pretrain.lm_loss = poisoned
    return setup


def nonfinite():
    out = {}
    for zero in (0, 1):
        save = os.path.join(OUT, f"nan_zero{zero}")
        res = run(f"nan_zero{zero}", flags(save, 5, "--save-interval", "1", zero=zero), setup=nan_loss_at({3}))
        states = {i: fi.checkpoint_state(os.path.join(save, f"iter_{i:07d}")) for i in (2, 3, 4)}
        out[f"zero{zero}"] = {"code": res["code"], "log": res["log"],
                              "skipped_unchanged": fi.bitwise_equal(states[2], states[3]),
                              "next_changed": fi.bitwise_equal(states[3], states[4])}
    save = os.path.join(OUT, "nan_halt")
    res = run("nan_halt", flags(save, 20, "--max-skipped-steps", "3", zero=0), setup=nan_loss_at(set(range(4, 21))))
    out["halt"] = {"code": res["code"], "log": res["log"],
                   "latest": open(os.path.join(save, "latest")).read().strip()}
    return out


# --- a full disk during a save ---------------------------------------------------------------------
def disk_full():
    save = os.path.join(OUT, "enospc")

    def fill_disk_at_second_save():
        import torch
        real_save = torch.save

        def save_or_fail(obj, f, *a, **kw):
            if isinstance(f, str) and "iter_0000004.partial" in f:
                with open(f, "wb") as out:
                    out.write(b"\0" * 1000)  # what fitted before the disk was full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
            return real_save(obj, f, *a, **kw)
        torch.save = save_or_fail
    full = run("enospc_full", flags(save, 6), setup=fill_disk_at_second_save)
    after = {"latest": open(os.path.join(save, "latest")).read().strip(),
             "entries": sorted(os.listdir(save))}
    from ssa_megatron.training.checkpoint_format import verify_checkpoint
    intact = verify_checkpoint(os.path.join(save, "iter_0000002"))
    again = run("enospc_again", flags(save, 6))
    return {"code": full["code"], "log": full["log"], **after, "iter2_problem": intact[0],
            "again": again["code"], "again_iterations": iterations(again["log"])}


# --- damaged .bin / .idx ------------------------------------------------------------------------------
def bad_data():
    d = os.path.join(OUT, "data")
    os.makedirs(d, exist_ok=True)
    for ext in (".bin", ".idx", ".tokenizer.json"):
        shutil.copy(DATA + ext, os.path.join(d, "cut" + ext))
        shutil.copy(DATA + ext, os.path.join(d, "mixed" + ext))
    with open(os.path.join(d, "cut.bin"), "r+b") as f:
        f.truncate(1000)
    other = fi.write_random_corpus(os.path.join(d, "other"), num_docs=50, seed=5)
    shutil.copy(other + ".idx", os.path.join(d, "mixed.idx"))
    out = {}
    for name in ("cut", "mixed"):
        argv = flags(os.path.join(OUT, f"data_{name}_ckpt"), 2)
        argv[argv.index("--data-path") + 1] = os.path.join(d, name)
        res = run(f"data_{name}", argv)
        out[name] = {"code": res["code"], "log": res["log"]}
    return out


# --- each kind of checkpoint file: truncated, deleted, flipped -----------------------------------
def corrupt_each_file():
    from ssa_megatron.convert.layout import ConversionError
    from ssa_megatron.convert.megatron_ckpt import read_checkpoint
    from ssa_megatron.training.checkpoint_format import CheckpointError, select_checkpoint
    base = os.path.join(OUT, "corrupt_base")
    made = run("corrupt_make", flags(base, 4))
    kinds = sorted(os.path.relpath(os.path.join(r, f), os.path.join(base, "iter_0000004"))
                   for r, _, fs in os.walk(os.path.join(base, "iter_0000004")) for f in fs)
    cases = []
    for kind in kinds + ["../latest"]:
        for how in ("truncate", "delete", "flip"):
            work = os.path.join(OUT, "corrupt_work")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base, work)
            path = os.path.normpath(os.path.join(work, "iter_0000004", kind))
            size = os.path.getsize(path)
            if how == "truncate":
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
            elif how == "delete":
                os.remove(path)
            else:
                with open(path, "r+b") as f:
                    f.seek(size // 2)
                    byte = f.read(1)
                    f.seek(size // 2)
                    f.write(bytes([byte[0] ^ 0xFF]))
            case = {"file": kind, "how": how}
            try:
                tag, notes = select_checkpoint(work)
                case.update(tag=tag, notes=notes)
            except CheckpointError as err:
                case.update(tag=None, error=str(err))
            warnings = []
            try:
                _, meta, _ = read_checkpoint(work, warn=warnings.append)
                case.update(convert_iteration=meta["iteration"], convert_warnings=warnings)
            except ConversionError as err:
                case.update(convert_iteration=None, convert_error=str(err))
            cases.append(case)
    return {"made": made["code"], "kinds": kinds, "cases": cases}


def fault_loop():
    return fi.run_trials(int(os.environ.get("SSA_FAULT_TRIALS", "5")), os.path.join(OUT, "fault"), DATA,
                         train_iters=8, save_interval=2, seed=3)


SCENARIOS = [restart_without_load, two_runs, damaged_checkpoint, ctrl_c, nonfinite, disk_full, bad_data,
             corrupt_each_file, fault_loop]


if __name__ == "__main__":
    OUT, DATA = sys.argv[1], sys.argv[2]
    names = [s.__name__ for s in SCENARIOS]
    if sys.argv[3:4] == ["--except"]:  # every scenario but those named
        wanted = [n for n in names if n not in sys.argv[4:]]
    else:
        wanted = sys.argv[3:] or names
    os.makedirs(OUT, exist_ok=True)
    fi.preload()
    import torch
    torch.set_num_threads(1)
    results = {}
    for scenario in SCENARIOS:
        if scenario.__name__ not in wanted:
            continue
        t0 = time.time()
        try:
            results[scenario.__name__] = scenario()
        except Exception:
            results[scenario.__name__] = {"crashed": traceback.format_exc()}
        results[scenario.__name__ + "_seconds"] = round(time.time() - t0, 1)
        print(f"{scenario.__name__}: {results[scenario.__name__ + '_seconds']} s", flush=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
