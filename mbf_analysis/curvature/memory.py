"""Memory budget: refuse dense blocks that would not fit, and size the batch chunks.

The budget is a number of bytes. By default it is half of the memory that is free on the device
that holds the model (``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` from
``/proc/meminfo`` on CPU), overridable per call or with ``$MBF_MEMORY_BUDGET`` (bytes, or with a
``K``/``M``/``G`` suffix).
"""

from __future__ import annotations

import os

import torch

from mbf_analysis.errors import ConfigError, MemoryBudgetError

__all__ = [
    "default_budget",
    "resolve_budget",
    "format_bytes",
    "check_dense",
    "chunk_size_for",
    "check_chunk",
]

_FALLBACK_CPU_BYTES = 4 * 2**30
_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def format_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _parse_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = _SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in _SUFFIXES else text
    try:
        return int(float(number) * factor)
    except ValueError as err:
        raise ConfigError(
            f"MBF_MEMORY_BUDGET={text!r} is not a size; use bytes or a K/M/G suffix, e.g. 8G."
        ) from err


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _FALLBACK_CPU_BYTES


def default_budget(device: torch.device | str = "cpu") -> int:
    """Half the free memory of ``device``, or ``$MBF_MEMORY_BUDGET`` when set."""
    env = os.environ.get("MBF_MEMORY_BUDGET")
    if env:
        return _parse_bytes(env)
    return _free_bytes(torch.device(device)) // 2


def resolve_budget(budget: int | None, device: torch.device | str) -> int:
    """``budget`` if given (must be positive), else :func:`default_budget`."""
    if budget is None:
        return default_budget(device)
    if budget <= 0:
        raise ConfigError(f"memory_budget must be a positive number of bytes, got {budget}.")
    return int(budget)


def check_dense(
    sizes: dict[str, int], itemsize: int, budget: int, *, what: str = "dense layer Fisher"
) -> None:
    """Refuse, before allocating, ``[d, d]`` matrices that exceed ``budget`` bytes.

    Args:
        sizes: Layer name → ``d``.
        itemsize: Bytes per entry (4 for float32, 8 for float64).
        budget: Bytes available.
        what: What is being allocated, for the message.

    Raises:
        MemoryBudgetError: Naming the largest layer, its size, the total, the budget, and the
            alternatives.
    """
    need = {name: d * d * itemsize for name, d in sizes.items()}
    total = sum(need.values())
    if total <= budget:
        return
    worst = max(need, key=need.get)
    raise MemoryBudgetError(
        f"the {what} of layer '{worst}' ({sizes[worst]}×{sizes[worst]}) needs "
        f"{format_bytes(need[worst])}; all requested layers together need {format_bytes(total)}, "
        f"over the memory budget of {format_bytes(budget)}. Use the mini-blocks "
        "(miniblock_fisher), restrict to fewer layers (layers=[...]) or a parameter subset, or "
        "raise the budget (memory_budget=..., $MBF_MEMORY_BUDGET)."
    )


def chunk_size_for(
    n_samples: int,
    bytes_per_sample: int,
    budget: int,
    *,
    fraction: float = 0.25,
    detail: str | None = None,
) -> int:
    """Samples per chunk so that one chunk's per-sample tensors use ``fraction`` of ``budget``.

    Args:
        detail: What one sample costs, for the message (e.g.
            :meth:`~mbf_analysis.curvature.footprint.PassFootprint.describe`).

    Raises:
        MemoryBudgetError: When even one sample does not fit.
    """
    room = int(budget * fraction)
    if bytes_per_sample > room:
        cost = detail or f"{format_bytes(bytes_per_sample)} per sample"
        raise MemoryBudgetError(
            f"one sample of this pass needs {cost}, more than {format_bytes(room)} "
            f"({fraction:.0%} of the memory budget of {format_bytes(budget)}). Restrict to fewer "
            "layers or raise the budget (memory_budget=..., $MBF_MEMORY_BUDGET)."
        )
    return max(1, min(n_samples, room // max(bytes_per_sample, 1)))


def check_chunk(chunk: int, bytes_per_sample: int, budget: int, *, detail: str) -> None:
    """Refuse an explicit chunk size whose pass would exceed ``budget`` bytes.

    Raises:
        MemoryBudgetError: Naming the chunk's estimated need and the largest chunk that fits.
    """
    need = chunk * bytes_per_sample
    if need > budget:
        fits = budget // max(bytes_per_sample, 1)
        raise MemoryBudgetError(
            f"a chunk of {chunk} samples needs about {format_bytes(need)} ({detail}), over the "
            f"memory budget of {format_bytes(budget)}. Use chunk_size={max(fits, 1)} or less, "
            "chunk_size=None (sized from the budget), or raise the budget (memory_budget=..., "
            "$MBF_MEMORY_BUDGET)."
        )
