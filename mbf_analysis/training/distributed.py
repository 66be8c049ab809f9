"""Training in several processes under ``torchrun``: the world, its process group, and the few
collectives a run needs beyond DDP's gradient average.

One process per device. ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`world_from_env` reads them (``None`` for one process). :func:`start` opens the process
group: ``nccl`` on CUDA, one device per local rank (``cuda:LOCAL_RANK``), ``gloo`` on CPU, with
the collective timeout ``$MBF_DIST_TIMEOUT`` seconds (default 600, longer than an evaluation that
rank 0 does while the others wait). If one process dies, ``torchrun``'s agent stops the others.

What is shared (see :mod:`mbf_analysis.training.loop` for how a run uses it):

- **the data order and augmentation**: every process draws the permutation and the augmentation
  of the *global* batch from the same seeded generator and keeps its slice
  (:func:`local_slice`), so the batches are those of a one-process run on the same global batch;
- **the gradient**: averaged by ``DistributedDataParallel``; each process's loss is weighted by
  its share of the global batch, so the average is the global mean even when the last batch of an
  epoch does not divide evenly;
- **the decisions**: whether to stop (a limit measured on rank 0, or Ctrl-C/SIGTERM on any rank)
  and whether to checkpoint now are taken on rank 0 and agreed with one small all-reduce per step
  (:func:`agree`);
- **the logged loss**: the global minibatch mean (:func:`global_mean`), so every process logs the
  same rows; only rank 0 writes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mbf_analysis.errors import ConfigError, MBFError

__all__ = [
    "World",
    "world_from_env",
    "current_world",
    "share",
    "on_main",
    "finish",
    "start",
    "stop",
    "local_slice",
    "agree",
    "global_mean",
    "gather_objects",
    "broadcast_object",
]

_DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """The processes of a ``torchrun`` job.

    Attributes:
        size: ``WORLD_SIZE``, the number of processes.
        rank: ``RANK`` of this process (0 writes every file).
        local_rank: ``LOCAL_RANK`` on this node (its CUDA device index).
    """

    size: int
    rank: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one writer."""
        return self.rank == 0


def world_from_env(environ: dict[str, str] | None = None) -> World | None:
    """The world ``torchrun`` describes in the environment, or ``None`` for one process.

    Raises:
        ConfigError: For values that are not a consistent ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``.
    """
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ConfigError(
            f"WORLD_SIZE/RANK/LOCAL_RANK must be integers, got {env.get('WORLD_SIZE')!r}, "
            f"{env.get('RANK')!r}, {env.get('LOCAL_RANK')!r}"
        ) from err
    if size <= 1:
        return None
    if not 0 <= rank < size or local < 0:
        raise ConfigError(f"RANK={rank} (LOCAL_RANK={local}) is outside WORLD_SIZE={size}")
    return World(size, rank, local)


def current_world() -> World | None:
    """The world of the open process group (``None`` without one, or with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    rank = dist.get_rank()
    return World(dist.get_world_size(), rank, int(os.environ.get("LOCAL_RANK", rank)))


def share(value: Any, world: World | None) -> Any:
    """Rank 0's ``value`` on every process of ``world`` (``value`` itself without one)."""
    return value if world is None else broadcast_object(value, world)


def start(world: World, device: str | torch.device) -> torch.device:
    """Open the process group for ``device``'s type; returns this process's device.

    Raises:
        ConfigError: CUDA asked for but this node has fewer devices than the local rank needs.
    """
    device = torch.device(device)
    text = os.environ.get("MBF_DIST_TIMEOUT", str(_DEFAULT_TIMEOUT_S))
    try:
        timeout = timedelta(seconds=float(text))
    except ValueError as err:
        raise ConfigError(f"MBF_DIST_TIMEOUT={text!r} is not a number of seconds") from err
    if device.type == "cuda":
        if torch.cuda.device_count() <= world.local_rank:
            raise ConfigError(
                f"LOCAL_RANK {world.local_rank} needs cuda:{world.local_rank}, but this node has "
                f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes "
                "per node (--nproc-per-node)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        options = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **options)
    return device


def on_main(work: Callable[[], Any], world: World | None) -> Any:
    """``work()`` on rank 0 (every process without a world), its result on every process.

    A refusal on rank 0 (an ``MBFError``, an ``OSError`` or a ``ValueError`` of a file) is raised
    there and, as a :class:`~mbf_analysis.errors.ConfigError` that quotes it, on every other
    process, so that none waits in a collective for a rank that has stopped.
    """
    if world is None:
        return work()
    outcome, error = None, None
    if world.main:
        try:
            outcome = ("ok", work())
        except (MBFError, OSError, ValueError) as err:
            error, outcome = err, ("error", f"{type(err).__name__}: {err}")
    outcome = broadcast_object(outcome, world)
    if outcome[0] == "ok":
        return outcome[1]
    if error is not None:
        raise error
    raise ConfigError(f"rank 0 stopped the run: {outcome[1]}")


def finish(world: World | None) -> None:
    """At the normal end of a job: wait until every process is there, so that none closes its
    connections while another still talks to it (gloo aborts a process whose peer left)."""
    if world is not None and dist.is_initialized():
        dist.barrier()


def stop() -> None:
    """Close the process group, if open (after :func:`finish` on a normal end; at once after an
    error, when a barrier could wait for a process that will never come)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_slice(index: Tensor, world: World) -> Tensor:
    """This process's part of a global batch's indices: contiguous, sizes differing by at most 1
    (``torch.tensor_split``); every part is non-empty when ``len(index) ≥ world.size``."""
    return index.tensor_split(world.size)[world.rank]


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(values: list[float]) -> list[float]:
    """The elementwise maximum of ``values`` over the processes (one all-reduce)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def global_mean(local_mean: Tensor, local_count: int, global_count: int) -> float:
    """``(1/N) Σ_r n_r · mean_r``: the mean over the global batch from the processes' means."""
    tensor = (local_mean.detach().double() * (local_count / global_count)).to(_device())
    dist.all_reduce(tensor)
    return float(tensor)


def gather_objects(value: Any, world: World) -> list[Any] | None:
    """Every process's ``value`` on rank 0 (in rank order); ``None`` on the others."""
    out = [None] * world.size if world.main else None
    dist.gather_object(value, out, dst=0)
    return out


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every process."""
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
