"""Per-layer summary of the empirical and true Fisher: sizes, spectra, mini-block mass.

For a layer block ``F`` (``[d, d]``, mini-block order of METHODS.md §2) and damping ``λ``:

- ``trace = tr F``; ``eig_min``, ``eig_max``: extreme eigenvalues of ``F``;
- ``cond = (eig_max + λ) / (eig_min + λ)``, the condition number of ``F + λI``;
- ``miniblock_mass = Σ_{(i,j) ∈ blocks} |P_ij| / Σ_{i,j} |P_ij|`` with ``P = (F + λI)⁻¹``
  (METHODS.md §5), next to ``miniblock_area``, the fraction of the ``d × d`` entries that the
  mini-blocks cover. A mass well above the area says the inverse concentrates in the mini-blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mbf_analysis.curvature import layer_fisher
from mbf_analysis.errors import ConfigError
from mbf_analysis.layout import LayerLayout, model_layouts

__all__ = ["miniblock_mass", "fisher_summary"]


def miniblock_mass(matrix: Tensor, blocks: LayerLayout | Sequence[int]) -> tuple[float, float]:
    """Mass and area fractions of the diagonal mini-blocks in ``|matrix|``.

    With mini-blocks ``b`` of sizes ``s_b`` laid out along the diagonal (``Σ_b s_b = d``):
    ``mass = Σ_b Σ_{(i,j) ∈ b×b} |M_ij| / Σ_{i,j} |M_ij|`` and ``area = Σ_b s_b² / d²``.

    Args:
        matrix: ``[d, d]`` in mini-block order.
        blocks: The layer's layout, or the block sizes ``[s_1, ..., s_B]`` in diagonal order
            (e.g. of a parameter subset).

    Returns:
        ``(mass, area)``; ``mass`` is NaN for an all-zero matrix.

    Raises:
        ValueError: If the block sizes do not add up to ``d`` or ``matrix`` is not square.
    """
    sizes = blocks.block_sizes if isinstance(blocks, LayerLayout) else [int(s) for s in blocks]
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or sum(sizes) != matrix.shape[0]:
        raise ConfigError(
            f"block sizes adding up to {sum(sizes)} do not tile the diagonal of a matrix of "
            f"shape {list(matrix.shape)}."
        )
    ids = torch.repeat_interleave(
        torch.arange(len(sizes), device=matrix.device), torch.tensor(sizes, device=matrix.device)
    )
    mask = ids[:, None] == ids[None, :]
    absolute = matrix.abs()
    total = absolute.sum()
    mass = float(absolute[mask].sum() / total) if total > 0 else float("nan")
    return mass, sum(s * s for s in sizes) / matrix.shape[0] ** 2


def _describe_blocks(layout: LayerLayout) -> str:
    return " + ".join(f"{g.count}×{g.size}" for g in layout.groups)


def fisher_summary(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    kinds: Sequence[str] = ("empirical", "exact"),
    damping: float = 1e-3,
    layers: Sequence[str] | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per layer and Fisher kind, with the statistics of the module docstring.

    Args:
        model, loss_fn, inputs, targets: As for :func:`mbf_analysis.curvature.layer_fisher`.
        kinds: Fisher kinds (``"empirical"``, ``"exact"``, ``"mc"``).
        damping: ``λ`` for ``cond`` and the mass of ``(F + λI)⁻¹``; must be positive.
        layers: Module names (default: every trainable module).
        progress: Show a progress bar over the kinds.

    Returns:
        Columns ``layer, kind, dim, blocks, trace, eig_min, eig_max, cond, miniblock_mass,
        miniblock_area``.
    """
    if damping <= 0:
        raise ConfigError(f"damping must be positive, got {damping}.")
    layouts = model_layouts(model)
    rows = []
    for kind in tqdm(kinds, desc="Fisher kinds", disable=not progress):
        blocks = layer_fisher(
            model,
            loss_fn,
            inputs,
            targets,
            kind=kind,
            layers=layers,
            mc_samples=mc_samples,
            generator=generator,
        )
        for name, fisher in blocks.items():
            layout = layouts[name]
            f64 = fisher.double()
            eigs = torch.linalg.eigvalsh(f64)
            identity = torch.eye(layout.dim, dtype=f64.dtype, device=f64.device)
            mass, area = miniblock_mass(torch.linalg.inv(f64 + damping * identity), layout)
            rows.append(
                {
                    "layer": name,
                    "kind": kind,
                    "dim": layout.dim,
                    "blocks": _describe_blocks(layout),
                    "trace": float(eigs.sum()),
                    "eig_min": float(eigs[0]),
                    "eig_max": float(eigs[-1]),
                    "cond": float((eigs[-1] + damping) / (eigs[0].clamp_min(0) + damping)),
                    "miniblock_mass": mass,
                    "miniblock_area": area,
                }
            )
    return pd.DataFrame(rows)
