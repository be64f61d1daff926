"""Training in several processes with torch.distributed (DDP): who this process is, its
share of each batch, and starting the workers through PyTorch's own elastic launcher.

A training stage with `train.processes` = N > 1 starts N workers on this machine
(`launch`); a stage started by a user's `torchrun` (one node or several) finds RANK,
WORLD_SIZE and LOCAL_RANK set and joins that world instead (`World.from_environment`).
Every worker draws the same seeded permutation and the same noise for the whole global
batch of `train.batch_size` images, and trains on its own contiguous rows of it
(`World.rows`); DDP averages the gradients. So the schedule, EMA and learning rate
mean what they mean in one process, and only the order of floating-point sums differs.
Only rank 0 writes outputs, checkpoints and logs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddpm_core.errors import ConfigError, DDPMError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; World() is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> World:
        """The world a launcher (torchrun, `launch`) put this process in, or a single process."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            rank, size, local_rank = (int(os.environ.get(key, "0")) for key in ENV_KEYS)
        except ValueError:
            raise ConfigError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers; got {[os.environ.get(k) for k in ENV_KEYS]}"
            ) from None
        if not 0 <= rank < size:
            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={size}")
        return cls(rank, size, local_rank)

    def rows(self, n: int) -> slice:
        """This process's contiguous rows of a global batch of `n` (sizes differ by at most 1)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def device(self) -> torch.device | None:
        """One GPU per process on CUDA (the local rank's); None: the usual `hardware.pick_device`."""
        if self.size > 1 and torch.cuda.is_available() and os.environ.get("DDPM_DEVICE", "cuda").startswith("cuda"):
            return torch.device("cuda", self.local_rank)
        return None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all processes, in place (itself in a single process)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join(world: World, device: torch.device) -> None:
    """Join the process group: gloo on the CPU, NCCL on CUDA (one GPU per process)."""
    if world.size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=world.rank,
        world_size=world.size,
        timeout=timedelta(minutes=30),
    )


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel (it broadcasts rank 0's weights, then averages
    the gradients of every backward pass), or `model` itself in a single process."""
    if world.size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def check_processes(processes: int) -> None:
    """Refuse more processes than this machine has devices for: GPUs where CUDA is used,
    otherwise CPU cores (each worker needs a core of its own)."""
    if processes == 1:
        return
    forced = os.environ.get("DDPM_DEVICE", "")
    if torch.cuda.is_available() and (not forced or forced.startswith("cuda")):
        have, what = torch.cuda.device_count(), "CUDA devices"
    else:
        have, what = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
            "CPU cores",
        )
    if processes > have:
        raise ConfigError(
            f"train.processes = {processes}, but this machine has {have} {what}: give at most {have}, "
            "or start the stage under torchrun across several machines (docs/cluster.md)"
        )


def free_port() -> int:
    """A free TCP port on the loopback interface, for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_local(worker: Callable[..., None], size: int, job: dict) -> None:
    """`worker(rank, size, port, job)` in `size` processes spawned on this machine (their
    rendezvous on a free loopback `port`), or in this process when `size` is 1: training
    in several processes without a launcher, for the tests and benchmarks."""
    if size == 1:
        worker(0, 1, 0, job)
    else:
        torch.multiprocessing.spawn(worker, args=(size, free_port(), job), nprocs=size, join=True)


def launch(processes: int, argv: Sequence[str], name: str) -> None:
    """Run `python argv...` in `processes` workers on this machine through PyTorch's
    elastic launcher (what `torchrun --standalone` runs), with a rendezvous on a free
    loopback port and one share of the CPU cores per worker. Returns when all succeed;
    a failed worker has already printed its error, so this exits with its status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs every step of the rendezvous at INFO and a failure report at ERROR;
    # the workers' own one-line errors say what went wrong.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if not (os.environ.get("DDPM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // processes))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"{name}-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,  # a failed worker fails the stage; `dvc repro` resumes from the last epoch
        monitor_interval=0.5,
        start_method="spawn",
    )
    print(
        f"{name}: {processes} processes (torch.distributed, {os.environ['OMP_NUM_THREADS']} thread(s) each)", flush=True
    )
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: the worker printed nothing
            print(f"error: {name}: worker rank {rank} was killed ({signal.Signals(-code).name})", file=sys.stderr)
            sys.exit(128 - code)
        sys.exit(code)
    except SignalException as exc:
        raise KeyboardInterrupt(exc.sigval.name) from None
    except DDPMError:
        raise
    except Exception as exc:  # the rendezvous itself: a port taken meanwhile, say
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DDPMError(f"{name}: could not start {processes} processes: {first}") from None
