"""Run a function of tests/dist_workers.py on N real processes (gloo), collect rank 0's result."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(name: str, world_size: int, out_dir: str, *args: str, timeout: int = 600):
    os.makedirs(out_dir, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
        log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.join(HERE, "dist_workers.py"), name,
                                        out_dir, *args], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append((rank, code))
    if failed:
        tails = []
        for rank, code in failed:
            with open(os.path.join(out_dir, f"rank{rank}.log")) as f:
                tails.append(f"--- rank {rank} exit {code}\n" + "".join(f.readlines()[-30:]))
        raise AssertionError(f"{name} x{world_size} failed:\n" + "\n".join(tails))
    return torch.load(os.path.join(out_dir, "result.pt"), weights_only=False)
