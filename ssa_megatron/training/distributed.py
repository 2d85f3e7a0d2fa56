"""Process-group set-up: torch.distributed (NCCL on GPU, gloo on CPU) + megatron parallel_state."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from ssa_megatron.compat import enable_cpu_fallbacks


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Initialise from torchrun/Slurm-style env vars (single process when none are set)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    if world_size % (tp * pp):
        from ssa_megatron.errors import ConfigError
        raise ConfigError(f"world size {world_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # a lone process needs no agreed port: it listens on a free one without writing it into
            # os.environ, where a launcher started later from this process would find it taken
            # (under torchrun, even with one process, the port is the launcher's store: keep it)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    import deepspeed

    from ssa_megatron.console import announce_deepspeed_build
    from ssa_megatron.training.build_lock import abandoned_lock_cleared, deepspeed_cpu_op_build_dir
    build_dir = deepspeed_cpu_op_build_dir()
    with announce_deepspeed_build(build_dir), abandoned_lock_cleared(build_dir):
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
    enable_cpu_fallbacks()
    set_seed(seed)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_seed(seed: int) -> None:
    """Same init on every rank (weights are split from one CPU master), TP streams for dropout."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed(barrier: bool = False) -> None:
    """Tear down megatron's groups and torch.distributed. Call it before a process exits: gloo's
    worker threads still running at interpreter teardown can abort the process ("terminate
    called without an active exception"). ``barrier`` first waits for every rank."""
    if barrier and dist.is_initialized():
        dist.barrier()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
