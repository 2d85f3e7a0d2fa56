"""A build lock left by a process killed while loading DeepSpeed's CPU op must not hang later runs."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from torch.utils.file_baton import FileBaton

from ssa_megatron.training.build_lock import abandoned_lock_cleared, processes_holding, remove_if_abandoned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _waits_for(lock: str, seconds: float) -> bool:
    """True when torch's own wait on ``lock`` returns within ``seconds``."""
    waiter = threading.Thread(target=FileBaton(lock, wait_seconds=0.05).wait, daemon=True)
    waiter.start()
    waiter.join(seconds)
    return not waiter.is_alive()


def _holder(lock: str) -> subprocess.Popen:
    """A process that has the lock open, as torch's FileBaton does while it loads."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({lock!r}, os.O_CREAT | os.O_EXCL)
        print("holding", flush=True)
        time.sleep(300)
    """)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_an_abandoned_lock_is_removed_and_the_wait_ends(tmp_path):
    lock = str(tmp_path / "lock")
    holder = _holder(lock)
    holder.send_signal(signal.SIGKILL)  # killed inside the load: the file stays, nobody has it open
    holder.wait()
    assert os.path.exists(lock) and processes_holding(lock) == []
    said = []
    with abandoned_lock_cleared(str(tmp_path), poll_s=0.1, say=said.append):
        assert _waits_for(lock, 20)
    assert not os.path.exists(lock)
    assert len(said) == 1 and said[0].startswith(f"removed {lock}: a build lock left by a process that was killed")


def test_a_live_lock_is_kept_until_its_holder_dies(tmp_path):
    lock = str(tmp_path / "lock")
    holder = _holder(lock)
    try:
        assert processes_holding(lock) == [holder.pid]
        assert not remove_if_abandoned(lock, confirm_after_s=0.1)
        said = []
        with abandoned_lock_cleared(str(tmp_path), poll_s=0.1, say=said.append):
            assert not _waits_for(lock, 1.5)  # a live build: waiting is right
            assert os.path.exists(lock) and said == []
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            assert _waits_for(lock, 20)
        assert said and not os.path.exists(lock)
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_released_normally_is_left_to_its_owner(tmp_path):
    lock = str(tmp_path / "lock")
    baton = FileBaton(lock)
    assert baton.try_acquire()
    with abandoned_lock_cleared(str(tmp_path), poll_s=0.05, say=print):
        time.sleep(0.3)
        assert os.path.exists(lock)  # held by this very process
        baton.release()  # closes, then removes: must not race with the watcher
    assert not os.path.exists(lock)


def test_init_distributed_clears_an_abandoned_lock_of_deepspeeds_cpu_op(tmp_path):
    """The wiring: ``init_distributed`` (every training run's start) does not wait forever on a lock
    left in DeepSpeed's build directory by a run killed during its start-up."""
    build_dir = tmp_path / "deepspeed_shm_comm"
    build_dir.mkdir()
    lock = str(build_dir / "lock")
    holder = _holder(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    script = textwrap.dedent(f"""
        import deepspeed
        from torch.utils.file_baton import FileBaton
        from ssa_megatron.training import distributed
        # what DeepSpeed's load does on the CPU, without compiling anything
        deepspeed.init_distributed = lambda **kw: FileBaton({lock!r}, wait_seconds=0.05).wait()
        distributed.init_distributed()
        print("initialised", flush=True)
        distributed.destroy_distributed()
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), WORLD_SIZE="1", RANK="0",
               PYTHONPATH=ROOT, SSA_SHOW_LIBRARY_NOTICES="0")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised" in proc.stdout and not os.path.exists(lock)
    assert f"removed {lock}" in proc.stdout
