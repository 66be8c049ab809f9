r"""Inverse-Fisher heatmaps of layers and parameter subsets (paper Fig. 5, 13, 14; METHODS.md §5).

For a parameter subset ``S`` of one layer (a list of positions in the layer vector of
METHODS.md §2, ordered so that its mini-blocks are contiguous) and damping ``λ``:

.. math::

    F_S = \frac{1}{N} \sum_{n=1}^{N} \sum_{r \in R_n} r_S r_S^\top, \qquad
    P_S = (F_S + \lambda I)^{-1},

with the factor rows ``R_n`` of :func:`mbf_analysis.curvature.fisher_rows` (``g_n`` for the
empirical Fisher, ``J_nᵀ s_nc`` for the exact true Fisher, sampled-label gradients for ``mc``).
``F_S`` is the principal sub-matrix of the layer's Fisher block on ``S`` and is accumulated from
the columns ``rows[:, S]``, so the dense ``[d, d]`` block of a large layer (``51 264²`` entries for
the Simple CNN's ``conv2``) is never formed. Note that ``P_S`` is the inverse of the restricted
Fisher, not a sub-matrix of the inverse of the whole layer's Fisher.

What the picture claims is quantified by the mini-block mass fraction
``Σ_{(i,j) in mini-blocks} |P_ij| / Σ_{i,j} |P_ij|`` next to the area the mini-blocks cover
(:func:`mbf_analysis.analysis.summary.miniblock_mass`).

Index conventions: ``N`` samples, ``R`` factor rows of a chunk, ``d`` parameters of a layer,
``k = |S|`` parameters of a subset, ``B`` mini-blocks of the subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mbf_analysis.analysis.summary import miniblock_mass
from mbf_analysis.curvature import FISHER_KINDS, fisher_rows
from mbf_analysis.curvature.memory import check_dense, resolve_budget
from mbf_analysis.errors import ConfigError
from mbf_analysis.layout import LayerLayout, model_layouts

__all__ = ["ParameterSubset", "InverseHeatmaps", "inverse_fisher_heatmaps"]

_ITEMSIZE = 8  # the restricted Fisher is accumulated and inverted in float64


@dataclass(frozen=True, eq=False)
class ParameterSubset:
    """Positions of some of one layer's parameters, ordered so that mini-blocks are contiguous.

    Attributes:
        layer: The module's qualified name.
        indices: ``[k]`` int64 positions in the layer vector (METHODS.md §2 order), no repeats.
        block_sizes: Sizes of the subset's mini-blocks along its diagonal; they add up to ``k``.
        label: Name used in tables, file names and plot titles (unique within one analysis).
    """

    layer: str
    indices: Tensor
    block_sizes: tuple[int, ...]
    label: str

    def __post_init__(self) -> None:
        indices = torch.as_tensor(self.indices, dtype=torch.int64).flatten().cpu()
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "block_sizes", tuple(int(s) for s in self.block_sizes))
        if any(s < 1 for s in self.block_sizes) or sum(self.block_sizes) != len(indices):
            raise ConfigError(
                f"subset {self.label!r}: block sizes {self.block_sizes[:5]}... must be positive "
                f"and add up to the number of indices ({len(indices)})."
            )
        if len(torch.unique(indices)) != len(indices):
            raise ConfigError(f"subset {self.label!r} repeats parameter positions.")

    @property
    def dim(self) -> int:
        """``k``, the number of parameters in the subset."""
        return len(self.indices)

    @property
    def n_blocks(self) -> int:
        """``B``, the number of mini-blocks."""
        return len(self.block_sizes)

    def describe_blocks(self) -> str:
        """Run-length description of the block sizes, e.g. ``"32×25 + 32×1"``."""
        runs: list[list[int]] = []
        for size in self.block_sizes:
            if runs and runs[-1][1] == size:
                runs[-1][0] += 1
            else:
                runs.append([1, size])
        return " + ".join(f"{count}×{size}" for count, size in runs)

    def check(self, layout: LayerLayout) -> None:
        """Raise ``ValueError`` unless the subset fits ``layout`` (same layer, indices in range)."""
        if layout.name != self.layer:
            raise ConfigError(f"subset {self.label!r} is for {self.layer!r}, not {layout.name!r}.")
        if self.dim and (int(self.indices.min()) < 0 or int(self.indices.max()) >= layout.dim):
            raise ConfigError(
                f"subset {self.label!r}: positions must lie in 0..{layout.dim - 1} "
                f"(layer {layout.name!r} has {layout.dim} parameters)."
            )

    @classmethod
    def whole_layer(cls, layout: LayerLayout, label: str | None = None) -> ParameterSubset:
        """All of a layer's parameters with its own mini-blocks (``label`` defaults to the name)."""
        return cls(
            layer=layout.name,
            indices=torch.arange(layout.dim),
            block_sizes=tuple(layout.block_sizes),
            label=label or layout.name,
        )

    @classmethod
    def conv_input_channel(
        cls,
        layout: LayerLayout,
        channel: int,
        *,
        bias: bool = False,
        label: str | None = None,
    ) -> ParameterSubset:
        """The kernels of a convolution that read input channel ``channel`` (0-based).

        For ``W`` of shape ``[C_out, C_in, k_h, k_w]`` these are the ``C_out`` kernels
        ``W[o, channel]``: ``C_out`` mini-blocks of size ``k_h·k_w``, in output-channel order.
        Kernel ``(o, i)`` entry ``(r, c)`` sits at ``((o·C_in + i)·k_h + r)·k_w + c`` in the layer
        vector. With ``groups > 1``, ``channel`` indexes ``W``'s second axis (the ``C_in/groups``
        channels that every kernel reads).

        Args:
            layout: A conv2d layout.
            channel: ``i`` in ``0 .. C_in - 1`` (0-based; the paper's "channel 1" is ``0``).
            bias: Append the ``C_out`` biases as ``C_out`` blocks of size 1.
            label: Name (default ``"<layer>.weight[:, i]"``, plus ``"+bias"``).

        Raises:
            ValueError: For a layer that is not a convolution or a channel out of range.
        """
        if layout.kind != "conv2d":
            raise ConfigError(
                f"layer {layout.name!r} is {layout.kind}, not a convolution; input-channel "
                "subsets need a Conv2d layer."
            )
        c_out, c_in, k_h, k_w = layout.param_shapes[0]
        if not 0 <= channel < c_in:
            raise ConfigError(
                f"input channel {channel} out of range for {layout.name!r}: its kernels read "
                f"{c_in} channels (0..{c_in - 1})."
            )
        size = k_h * k_w
        starts = (torch.arange(c_out) * c_in + channel) * size
        indices = (starts[:, None] + torch.arange(size)).flatten()
        sizes = [size] * c_out
        if bias:
            if not layout.has_bias:
                raise ConfigError(f"layer {layout.name!r} has no bias.")
            indices = torch.cat([indices, c_out * c_in * size + torch.arange(c_out)])
            sizes += [1] * c_out
        default = f"{layout.name}.weight[:, {channel}]" + ("+bias" if bias else "")
        return cls(
            layer=layout.name, indices=indices, block_sizes=tuple(sizes), label=label or default
        )


@dataclass(frozen=True)
class InverseHeatmaps:
    """Result of :func:`inverse_fisher_heatmaps`.

    Attributes:
        matrices: Fisher kind → subset label → ``P_S = (F_S + λI)⁻¹``, ``[k, k]`` float64 (signed;
            take ``.abs()`` for the heatmap).
        fishers: Fisher kind → subset label → the undamped ``F_S``, ``[k, k]`` float64 (to
            re-damp without another pass over the data).
        subsets: Subset label → :class:`ParameterSubset`, in the order given.
        summary: One row per subset and kind; columns ``subset, layer, kind, dim, n_blocks,
            blocks, damping, n_samples, trace, eig_max, damping_dominated, miniblock_mass,
            miniblock_area`` with ``trace = tr F_S``, ``eig_max`` its largest eigenvalue and
            ``damping_dominated = eig_max ≤ λ``: then every eigenvalue of ``F_S + λI`` lies in
            ``[λ, 2λ]``, ``P_S`` is within a factor 2 of ``I/λ`` and its mini-block mass says
            nothing about ``F_S`` (a dead channel, or a ``λ`` too large for the layer).
    """

    matrices: dict[str, dict[str, Tensor]]
    fishers: dict[str, dict[str, Tensor]]
    subsets: dict[str, ParameterSubset]
    summary: pd.DataFrame


def inverse_fisher_heatmaps(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    subsets: Sequence[ParameterSubset],
    *,
    kinds: Sequence[str] = ("empirical",),
    damping: float = 1e-3,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> InverseHeatmaps:
    """``P_S = (F_S + λI)⁻¹`` for every subset and Fisher kind, and their mini-block mass.

    One streaming pass of :func:`mbf_analysis.curvature.fisher_rows` per kind serves all
    subsets: ``F_S += rows[:, S]ᵀ rows[:, S]`` per chunk (``rows``: ``[R, d]``), accumulated in
    float64, divided by ``N``, damped and inverted with ``torch.linalg.inv`` in float64. Peak
    memory: ``F_S`` and ``P_S`` (``[k, k]`` float64) per subset and kind, one transient
    ``F_S + λI``, and one chunk of rows.

    Args:
        model: A network of supported modules (eval mode if it holds BatchNorm or Dropout).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: ``[N, *in_shape]``.
        targets: ``[N]`` class indices or ``[N, *out_shape]``.
        subsets: What to analyse; labels must be unique.
        kinds: Fisher kinds from ``("empirical", "exact", "mc")``.
        damping: ``λ > 0``.
        mc_samples: Labels drawn per input for ``kind="mc"``.
        generator: Randomness for ``kind="mc"``.
        chunk_size: Samples per BackPACK pass (default: from the memory budget).
        memory_budget: Bytes (default: half the free memory of the model's device); the
            ``[k, k]`` float64 matrices of all subsets and kinds (``2·kinds + 1`` per subset) are
            checked against it before allocation; half of it bounds the chunks of rows.
        progress: Show a progress bar over the kinds.

    Returns:
        The matrices, the subsets and the summary table (:class:`InverseHeatmaps`).

    Raises:
        ValueError: Unknown kind or layer, non-positive damping, repeated labels, a subset that
            does not fit its layer.
        MemoryBudgetError: Up front, if the subsets' dense matrices would not fit.
    """
    if damping <= 0:
        raise ConfigError(f"damping must be positive, got {damping}.")
    unknown = [k for k in kinds if k not in FISHER_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"Fisher kinds {list(kinds)}: choose from {', '.join(FISHER_KINDS)}.")
    if not subsets:
        raise ConfigError("no parameter subsets to analyse.")
    labels = [s.label for s in subsets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"subset labels must be unique, got {labels}.")
    layouts = model_layouts(model)
    for subset in subsets:
        if subset.layer not in layouts:
            raise ConfigError(
                f"layer {subset.layer!r} not found among the model's layers with parameters: "
                f"{', '.join(layouts)}."
            )
        subset.check(layouts[subset.layer])
    layers = list(dict.fromkeys(s.layer for s in subsets))
    device = next(model.get_submodule(layers[0]).parameters()).device
    budget = resolve_budget(memory_budget, device)
    # kept per subset and kind: F_S and P_S; plus the transient F_S + λI
    per_entry = _ITEMSIZE * (2 * len(kinds) + 1)
    check_dense({s.label: s.dim for s in subsets}, per_entry, budget, what="dense subset Fisher")
    index = {s.label: s.indices.to(device) for s in subsets}

    matrices: dict[str, dict[str, Tensor]] = {}
    fishers: dict[str, dict[str, Tensor]] = {}
    rows_out = []
    for kind in tqdm(kinds, desc="Fisher kinds", disable=not progress):
        sums = {
            s.label: torch.zeros(s.dim, s.dim, device=device, dtype=torch.float64) for s in subsets
        }
        stream = fisher_rows(
            model,
            loss_fn,
            inputs,
            targets,
            kind=kind,
            mc_samples=mc_samples,
            generator=generator,
            layers=layers,
            chunk_size=chunk_size,
            memory_budget=budget // 2,
        )
        for rows in stream:
            for s in subsets:
                r = rows[s.layer].index_select(1, index[s.label]).double()
                sums[s.label].addmm_(r.T, r)
        fishers[kind] = {label: total / len(inputs) for label, total in sums.items()}
        matrices[kind] = {}
        for s in subsets:
            fisher = fishers[kind][s.label]
            identity = torch.eye(s.dim, device=device, dtype=torch.float64)
            inverse = torch.linalg.inv(fisher + damping * identity)
            matrices[kind][s.label] = inverse
            eig_max = float(torch.linalg.eigvalsh(fisher)[-1])
            mass, area = miniblock_mass(inverse, s.block_sizes)
            rows_out.append(
                {
                    "subset": s.label,
                    "layer": s.layer,
                    "kind": kind,
                    "dim": s.dim,
                    "n_blocks": s.n_blocks,
                    "blocks": s.describe_blocks(),
                    "damping": damping,
                    "n_samples": len(inputs),
                    "trace": float(fisher.trace()),
                    "eig_max": eig_max,
                    "damping_dominated": eig_max <= damping,
                    "miniblock_mass": mass,
                    "miniblock_area": area,
                }
            )
    return InverseHeatmaps(
        matrices=matrices,
        fishers=fishers,
        subsets={s.label: s for s in subsets},
        summary=pd.DataFrame(rows_out),
    )
