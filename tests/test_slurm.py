"""slurm/pretrain.sbatch on a real Slurm cluster started on this machine (CPU, gloo).

The module fixture installs Slurm and MUNGE when they are missing (tools/ci_install_slurm.sh, apt-get),
then starts a one-node cluster whose every file lives in a temporary directory: munged (as user
munge, its own key and socket), slurmctld and slurmd (foreground children of this process, free
ports, CPUs = the real core count, select/cons_tres, proctrack/linuxproc, task/none, GresTypes=gpu
like a GPU cluster whose node has no GPU). It stops the three daemons by pid at the end.

Jobs are submitted exactly as a user would: `sbatch [options] slurm/pretrain.sbatch CONFIG`, with
`--gpus-per-node=0` and SSA_DEVICE=cpu for 2 gloo ranks on the CPU.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = "slurm/configs/tiny_cpu.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}
ITER_LINE = re.compile(r"iteration\s+(\d+)/(\d+) \| consumed samples\s+(\d+) \|.*? lm loss (\S+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


class LocalSlurm:
    """A one-node Slurm cluster in a temporary directory; daemons are children of this process."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ssa-slurm-", dir="/tmp")
        os.chmod(self.dir, 0o755)  # munged insists that every directory above its socket is searchable
        self.procs = {}
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf,
                        PATH=os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin")

    # --- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        import pwd
        d = self.dir
        munge_dir = os.path.join(d, "munge")
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(d, sub))
        pw = pwd.getpwnam("munge")
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))  # this cluster's own key, not the system's
        os.chmod(key, 0o600)
        for path in (munge_dir, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        self.munge_socket = os.path.join(munge_dir, "munge.socket")
        self._spawn("munged", [_which("munged"), "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
                               f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
                    user=pw.pw_uid, group=pw.pw_gid)
        self._wait(lambda: os.path.exists(self.munge_socket), 20, "munged did not create its socket")

        cpus = os.cpu_count() or 1
        with open(self.conf, "w") as f:
            f.write(f"""\
ClusterName=ssatest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=5
# the main scheduler runs every 2 s instead of 60 s: a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
MinJobAge=3600
InactiveLimit=0
MailProg=/bin/true
TmpFS={d}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", self.conf])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", self.host])
        self._wait(lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle",
                   60, "the node did not become idle")

    def _spawn(self, name, argv, **kw):
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL, **kw)
        log.close()

    def _wait(self, ready, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for path in sorted(glob.glob(os.path.join(self.dir, "log", "*"))):
            with open(path, errors="replace") as f:
                out.append(f"--- {path}\n" + "".join(f.readlines()[-25:]))
        return "\n".join(out)

    # --- stop: the daemons this object started, by pid ---------------------------------------------
    def stop(self) -> None:
        # end the jobs first (their ranks are slurmstepd's children, not ours), then the daemons
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.time() + 40
                while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- client commands ---------------------------------------------------------------------------
    def run(self, argv, env=None, check=True, **kw):
        proc = subprocess.run(argv, env=env or self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict:
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: str, timeout: float, log_path: str = "") -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(0.5)
        self.run(["scancel", job_id], check=False)
        raise AssertionError(f"job {job_id} not done in {timeout} s: {self.job(job_id)}\n"
                             f"{_tail(log_path)}\n{self.logs()}")


def _tail(path: str, n: int = 60) -> str:
    if not path or not os.path.exists(path):
        return f"(no {path})"
    with open(path, errors="replace") as f:
        return f"--- {path}\n" + "".join(f.readlines()[-n:])


@pytest.fixture(scope="module")
def slurm():
    if not sys.platform.startswith("linux"):
        pytest.skip("Slurm test needs Linux")
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "ci_install_slurm.sh")],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip("Slurm is not installed and cannot be installed here: " + proc.stderr.strip()[-500:])
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged (as user munge) needs root")
    cluster = LocalSlurm()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_utils import write_random_dataset
    return write_random_dataset(str(tmp_path_factory.mktemp("slurm_data") / "rand"), num_docs=300)


def submit(slurm, out_dir, name, *sbatch_opts, **env):
    """sbatch slurm/pretrain.sbatch tiny_cpu.sh as 2 CPU tasks; returns (job id, log path)."""
    os.makedirs(out_dir, exist_ok=True)
    job_env = dict(slurm.env, SSA_DEVICE="cpu", SSA_ROOT=ROOT, SSA_PYTHON=sys.executable,
                   SSA_MASTER_PORT=str(_free_port()), RUN_DIR=os.path.join(out_dir, "run"),
                   OMP_NUM_THREADS="1", **env)
    log = os.path.join(out_dir, f"{name}-%j.out")
    argv = ["sbatch", "--parsable", f"--job-name={name}", "--gpus-per-node=0", "--nodes=1",
            "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}", f"--chdir={ROOT}",
            *sbatch_opts, os.path.join(ROOT, "slurm", "pretrain.sbatch"), CONFIG]
    job_id = slurm.run(argv, env=job_env).stdout.strip().split(";")[0]
    return job_id, log.replace("%j", job_id)


def iteration_lines(text):
    """{iteration: (consumed samples, lm loss text)} from the log lines (the last print wins)."""
    return {int(m[1]): (int(m[3]), m[4]) for m in ITER_LINE.finditer(text)}


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def final_weights(ckpt_dir):
    import torch
    tag = read(os.path.join(ckpt_dir, "latest")).strip()
    files = sorted(glob.glob(os.path.join(ckpt_dir, tag, "*model_states.pt")))
    assert files, f"no model states in {ckpt_dir}/{tag}"
    return tag, torch.load(files[0], map_location="cpu", weights_only=False)["module"]


TRAIN_ITERS = 160


@pytest.fixture(scope="module")
def uninterrupted(slurm, dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    job, log = submit(slurm, out, "ssa-full", DATA_PATH=dataset, TRAIN_ITERS=str(TRAIN_ITERS))
    info = slurm.wait_job(job, 240, log)
    return dict(job=job, log=log, info=info, ckpt=os.path.join(out, "run", "checkpoints"),
                tb=os.path.join(out, "run", "tensorboard"))


def test_sbatch_trains_two_gloo_ranks_to_the_end(slurm, uninterrupted):
    info, log = uninterrupted["info"], uninterrupted["log"]
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert info["Restarts"] == "0"
    assert "2 ranks, rendezvous 127.0.0.1:" in text and "DP 2" in text, _tail(log)
    lines = iteration_lines(text)
    assert sorted(lines) == list(range(1, TRAIN_ITERS + 1)), _tail(log)
    assert float(lines[TRAIN_ITERS][1]) < float(lines[1][1]), "loss did not fall"
    assert "training finished" in text
    tag, _ = final_weights(uninterrupted["ckpt"])
    assert tag == f"iter_{TRAIN_ITERS:07d}"
    assert glob.glob(os.path.join(uninterrupted["tb"], "events.out.tfevents.*"))


def test_warning_signal_checkpoints_requeues_and_resumes_exactly(slurm, dataset, uninterrupted,
                                                                 tmp_path):
    """Slurm's time-limit warning, emulated: `scancel --signal=USR1 JOB` once training runs.

    `#SBATCH --signal=USR1@300` makes slurmctld send SIGUSR1 to the tasks of every job step some
    time before the limit; `scancel --signal=USR1` (without --batch) delivers the same signal along
    the same path (slurmctld → slurmd → slurmstepd → the tasks) but at a moment the test chooses:
    after iteration 10 is logged. Slurm's own warning fires only within ~60 s of its nominal time
    and its time limits have a 1-minute granularity, so waiting for it would make this test slow
    and its stop iteration random (test_real_time_limit_warning_reaches_the_ranks covers that path).
    """
    out = str(tmp_path)
    job, log = submit(slurm, out, "ssa-preempt", DATA_PATH=dataset, TRAIN_ITERS=str(TRAIN_ITERS))
    deadline = time.time() + 180
    while not any(n >= 10 for n in iteration_lines(read(log) if os.path.exists(log) else "")):
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), _tail(log)
        assert time.time() < deadline, _tail(log)
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", job])
    info = slurm.wait_job(job, 300, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert info["Restarts"] == "1", f"{info}\n{_tail(log)}"

    # first attempt: stopped at a step boundary with a checkpoint, asked for the requeue
    m = re.search(r"stop signal: saved (\S+)/iter_(\d+); exiting", text)
    assert m, _tail(log)
    stopped = int(m[2])
    assert 10 <= stopped < TRAIN_ITERS
    assert f"requeueing job {job}" in text
    # second attempt: resumed from that checkpoint, ran to the end
    assert text.count("attempt 2 on") == 1
    assert f"at iteration {stopped} ({stopped * 4} samples consumed)" in text, _tail(log)
    after_resume = text[text.index("attempt 2 on"):]
    resumed = iteration_lines(after_resume)
    assert sorted(resumed) == list(range(stopped + 1, TRAIN_ITERS + 1)), _tail(log)

    # same losses as the uninterrupted run at every step after the resume, same final weights
    full = iteration_lines(read(uninterrupted["log"]))
    for it in resumed:
        assert resumed[it] == full[it], f"iteration {it}: resumed {resumed[it]} vs uninterrupted {full[it]}"
    assert resumed[TRAIN_ITERS][1] == full[TRAIN_ITERS][1]
    import torch
    tag_a, a = final_weights(os.path.join(out, "run", "checkpoints"))
    tag_b, b = final_weights(uninterrupted["ckpt"])
    assert tag_a == tag_b == f"iter_{TRAIN_ITERS:07d}"
    assert a.keys() == b.keys()
    for name in a:
        if torch.is_tensor(a[name]):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_real_time_limit_warning_reaches_the_ranks(slurm, dataset, tmp_path):
    """A 1-minute job with `--signal=USR1@50`: Slurm's own warning arrives, every rank saves and
    exits 3. slurmctld sends the warning at its first periodic check (every 30 s) at which fewer
    than 50 s + 30 s remain, i.e. here 0-30 s after the start: before or after the first training
    step. Either way the ranks must save (a warning during start-up is kept by the handlers that
    slurm/launch.sh installs first, see ssa_megatron/training/signals.py) rather than die of
    SIGUSR1. Requeueing is off (SSA_MAX_RESTARTS=0): a requeued 1-minute run would get the same
    early warning again; the requeue path is covered above."""
    job, log = submit(slurm, str(tmp_path), "ssa-timelimit", "--time=1", "--signal=USR1@50",
                      DATA_PATH=dataset, TRAIN_ITERS="1000000", SSA_MAX_RESTARTS="0")
    info = slurm.wait_job(job, 150, log)
    text = read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", f"{info}\n{_tail(log)}"
    m = re.search(r"stop signal: saved (\S+)/iter_(\d+); exiting", text)
    assert m, _tail(log)
    assert read(os.path.join(str(tmp_path), "run", "checkpoints", "latest")).strip() == f"iter_{m[2]}"
    assert "not requeueing" in text


def test_single_node_examples_run_the_same_config_and_resume(dataset, tmp_path):
    """Both single-node launchers run the same config and resume each other's checkpoints:
    torchrun to 3, deepspeed on to 5, torchrun on to 7 in one run directory."""
    env = dict(os.environ, SSA_DEVICE="cpu", NPROC_PER_NODE="2", SSA_PYTHON=sys.executable,
               DATA_PATH=dataset, RUN_DIR=str(tmp_path / "run"), OMP_NUM_THREADS="1",
               MASTER_PORT=str(_free_port()))
    for launcher, iters in (("launch_torchrun.sh", 3), ("launch_deepspeed.sh", 5), ("launch_torchrun.sh", 7)):
        proc = subprocess.run(["bash", os.path.join(ROOT, "examples", launcher), CONFIG],
                              env=dict(env, TRAIN_ITERS=str(iters)), capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert proc.returncode == 0, launcher + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert read(str(tmp_path / "run" / "checkpoints" / "latest")).strip() == f"iter_{iters:07d}"
        if iters > 3:
            assert "resumed from" in proc.stdout and f"at iteration {iters - 2}" in proc.stdout, \
                launcher + proc.stdout[-3000:]
            assert sorted(iteration_lines(proc.stdout)) == [iters - 1, iters], launcher


@pytest.mark.parametrize("launcher", ["launch_torchrun.sh", "launch_deepspeed.sh"])
def test_single_node_launchers_refuse_a_taken_master_port_in_one_line(launcher, tmp_path):
    """A MASTER_PORT left in the shell that another process listens on: one error line naming
    it, before any rank starts (torchrun would fail later with a launcher traceback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, SSA_DEVICE="cpu", NPROC_PER_NODE="1", SSA_PYTHON=sys.executable,
                   DATA_PATH=str(tmp_path / "none"), RUN_DIR=str(tmp_path / "run"), MASTER_PORT=str(port))
        proc = subprocess.run(["bash", os.path.join(ROOT, "examples", launcher), CONFIG], env=env,
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: MASTER_PORT={port} is taken (or not a port) on this machine; "
        "unset MASTER_PORT to use a free port, or set a free one"), proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest")
    for wrong in ("70000", "-1", "abc"):  # not a port at all: the same one line, no traceback
        proc = subprocess.run(["bash", os.path.join(ROOT, "examples", launcher), CONFIG],
                              env=dict(env, MASTER_PORT=wrong), capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: MASTER_PORT={wrong} "), proc.stderr


def test_an_in_process_start_leaves_no_port_for_a_later_launcher():
    """A lone process (an evaluation, a notebook) listens on a free port of its own and does not
    write it into os.environ: a launcher it starts later would inherit a port that is taken."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    code = ("import os; from ssa_megatron.training.distributed import init_distributed; "
            "init_distributed(1, 1); import torch.distributed as dist; "
            "print(dist.get_world_size(), os.environ.get('MASTER_PORT'), os.environ.get('MASTER_ADDR'))")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(env, SSA_DEVICE="cpu", CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["1", "None", "None"], proc.stdout + proc.stderr[-2000:]


def test_scancel_saves_but_does_not_requeue(slurm, dataset, tmp_path):
    """A user's `scancel` (SIGTERM to the batch script and the ranks): the ranks save, but the job
    stays cancelled instead of requeueing itself."""
    job, log = submit(slurm, str(tmp_path), "ssa-cancel", DATA_PATH=dataset, TRAIN_ITERS="1000000")
    deadline = time.time() + 180
    while not any(n >= 3 for n in iteration_lines(read(log) if os.path.exists(log) else "")):
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), _tail(log)
        assert time.time() < deadline, _tail(log)
        time.sleep(0.2)
    slurm.run(["scancel", job])
    info = slurm.wait_job(job, 120, log)
    time.sleep(3)  # a wrongly requeued job would be PENDING again by now
    info = slurm.job(job)
    text = read(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{_tail(log)}"
    m = re.search(r"stop signal: saved (\S+)/iter_(\d+); exiting", text)
    assert m, _tail(log)
    assert "not requeueing" in text and "requeueing job" not in text, _tail(log)


def test_stop_signal_before_the_training_loop_is_kept(tmp_path):
    """`python -m ssa_megatron.training.signals MODULE` (what slurm/launch.sh runs): a SIGUSR1 that
    arrives before the trainer has built its StopSignal neither kills the process nor gets lost."""
    (tmp_path / "early_target.py").write_text(
        "import os, signal, sys\n"
        "os.kill(os.getpid(), signal.SIGUSR1)  # the warning, while the model would still be loading\n"
        "from ssa_megatron.training.signals import StopSignal\n"
        "stop = StopSignal()\n"
        "print('received', stop.received, 'any', stop.any_rank_received(), 'argv', sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run([sys.executable, "-m", "ssa_megatron.training.signals", "early_target", "--x", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"received {int(signal.SIGUSR1)} any True argv ['--x', '1']" in proc.stdout
