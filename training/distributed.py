"""What SFT processes need from ``torch.distributed``: single-process defaults without a launcher,
a per-node lock, and the few collectives (sum, all-ok, barrier) that work with or without a group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path


def ensure_distributed_env() -> None:
    """Single process without a launcher: set the variables DeepSpeed/torch.distributed read.

    Without them DeepSpeed tries MPI discovery (mpi4py) and fails.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


@contextlib.contextmanager
def distributed_env():
    """:func:`ensure_distributed_env` for the length of a block, then the caller's environment as it
    was: an in-process job (the lab, a flow, a test) leaves no RANK/MASTER_PORT behind for the
    subprocesses its caller starts later (they would try to join a process group on a dead port)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in names}
    ensure_distributed_env()
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def node_lock(path: Path):
    """An exclusive lock among the processes of one node (an flock on a file in the work folder)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def all_nodes_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (a MIN all-reduce; also a barrier)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(ok)], dtype=torch.long, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return ok


def collective_device():
    """Where a tensor for a collective must live: the current GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(value: int) -> int:
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.long, device=collective_device())
        dist.all_reduce(t)
        return int(t.item())
    return value


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (``PR_SET_PDEATHSIG``).

    A launcher started with this gets SIGTERM when the command that started it is killed, even
    by SIGKILL (and stops its workers); a worker asks for SIGKILL when its launcher dies. A no-op
    where prctl is not available.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
