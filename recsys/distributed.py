"""Training and evaluation over several processes with PyTorch's own engine: ``torch.distributed`` launched by
``torchrun`` (one machine: ``--nproc-per-node N``; several: ``--nnodes M --node-rank R --rdzv-backend c10d
--rdzv-endpoint HOST:PORT`` on each). See docs/scaling.md for the commands and what each rank reads and writes.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a process started without them is a world of
one, and every helper here is then a no-op, so the one-process path is the same code. The process group uses gloo
for CPU tensors and nccl for CUDA tensors ("cpu:gloo,cuda:nccl" when CUDA is present), and a CUDA rank trains on
``cuda:LOCAL_RANK``.

Only rank 0 has side effects (checkpoints, bundles, MLflow runs, registry versions, reports): ``on_main`` runs a
function there and tells every rank whether it succeeded, so the other ranks fail loudly, not by a time-out, when
rank 0 fails.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

# How many intra-op threads each rank uses; torchrun itself sets OMP_NUM_THREADS=1 for its workers.
THREADS_ENV = "RECSYS_THREADS"
# Rendezvous and collectives give up after this long (a rank that died is reported by torchrun long before).
TIMEOUT = datetime.timedelta(minutes=30)


def launched() -> bool:
    """True when this process is one of several ranks started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def restart_count() -> int:
    """How many times torchrun has restarted this job (``--max-restarts``); > 0 means resume from the checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def threads_per_rank(setting: int | None = None) -> int:
    """``setting``, else $RECSYS_THREADS, else the cores this process may use divided by the ranks on this machine."""
    if setting is None and os.environ.get(THREADS_ENV):
        setting = int(os.environ[THREADS_ENV])
    if setting is not None:
        if setting < 1:
            raise ValueError(f"threads per rank must be at least 1, got {setting}")
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init(threads: int | None = None) -> None:
    """Set this rank's threads and, under torchrun with more than one rank, join the process group. A process
    not started by torchrun keeps torch's own thread count (the cores) unless ``threads`` or $RECSYS_THREADS says."""
    if threads is not None or os.environ.get(THREADS_ENV) or "LOCAL_WORLD_SIZE" in os.environ:
        torch.set_num_threads(threads_per_rank(threads))
    if not launched() or active():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    global _STORE
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _STORE = _job_store(rank_, world)
    dist.init_process_group(backend=backend, store=_STORE, rank=rank_, world_size=world, timeout=TIMEOUT)


# Held here and dropped in ``shutdown`` after the process group, so the store's client thread ends before the
# interpreter tears down (left to interpreter exit it sometimes aborted: "terminate called without an active
# exception").
_STORE: dist.Store | None = None


def _job_store(rank_: int, world: int) -> dist.Store:
    """The key-value store the process group meets through: torchrun's (MASTER_ADDR:MASTER_PORT), under a prefix
    of its own for each restart. torchrun keeps one store for the whole job, so without the prefix a restarted rank
    can read the addresses its dead predecessor published and wait on them until the time-out (seen here: both
    ranks of a restarted job stuck in gloo's connect)."""
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts_it and rank_ == 0, timeout=TIMEOUT,
                          multi_tenant=not agent_hosts_it)
    return dist.PrefixStore(f"recsys/restart_{restart_count()}", store)


def shutdown(succeeded: bool = True) -> None:
    """Leave the process group. After a success the ranks first meet, so none tears its connections down while
    another still uses them; after a failure they do not (the others may be waiting elsewhere; torchrun ends them)."""
    global _STORE
    if active():
        if succeeded:
            barrier()
        dist.destroy_process_group()
    _STORE = None


def device_for(name: str) -> torch.device:
    """The training device: ``auto`` is this rank's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def _collective_device() -> torch.device:
    # gloo reduces CPU tensors; with the mixed backend, CUDA tensors go through nccl
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_array(array: np.ndarray, op: str = "sum") -> np.ndarray:
    """The element-wise sum (or max) of ``array`` over all ranks; the array itself in a world of one."""
    if not active():
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.cpu().numpy()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device() if torch.cuda.is_available() else None)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank. When it raises on rank 0, rank 0 re-raises
    and every other rank raises a RuntimeError naming the failure, instead of waiting at a barrier."""
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = exc
            outcome = (False, f"{type(exc).__name__}: {exc}")
    ok, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed, so rank {rank()} stops too: {value}")
    return value


def check_same(label: str, value: str) -> None:
    """Every rank must hold the same ``value`` (e.g. the dataset's content hash); a mismatch names the ranks."""
    if not active():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise ValueError(f"ranks disagree on the {label}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                         + "; every machine must read the same processed dataset")


def epoch_seed(seed: int, epoch: int, rank_: int) -> int:
    """The torch seed of one rank for one epoch (dropout, negative sampling): a function of (seed, epoch, rank)
    alone, so a resumed or restarted run draws exactly what an uninterrupted one draws."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{rank_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shard(n: int) -> np.ndarray:
    """This rank's share of ``n`` rows: rows rank, rank + world, ... (rows sorted by length deal evenly)."""
    return np.arange(rank(), n, world_size())
