"""How a layer's parameters split into mini-blocks (METHODS.md §2).

This module is the one place that knows the order of a layer's parameter vector. Everything
else (curvature extraction, methods, analyses, the optimizer) asks a :class:`LayerLayout` to
flatten, split or reassemble tensors.

Index conventions (used in every docstring below):

- ``*``: any leading batch dimensions (samples, Monte-Carlo draws, ...), left untouched.
- ``d``: the layer's parameter count (weight and bias together).
- ``B``: the number of mini-blocks in one block group, ``s`` their common size.

Orders (the mini-blocks are contiguous, so they sit on the diagonal of a ``[d, d]`` block):

- ``nn.Linear(n_in -> n_out)``: ``θ = [W[0,:], b[0], W[1,:], b[1], ...]`` (neuron-major).
  One group ``"<module>"`` of ``n_out`` blocks of size ``n_in + 1`` (``n_in`` without bias).
- ``nn.Conv2d(C_in -> C_out, k_h × k_w, groups=g)``:
  ``θ = [vec W[0,0], vec W[0,1], ..., vec W[C_out-1, C_in/g-1], b[0], ..., b[C_out-1]]`` with
  ``vec`` the row-major flatten of a kernel. Groups ``"<module>.weight"`` (``C_out·C_in/g``
  blocks of size ``k_h·k_w``) and ``"<module>.bias"`` (``C_out`` blocks of size 1).
- Normalization layers (``BatchNorm*``, ``LayerNorm``, ``GroupNorm``): ``θ = [weight, bias]``,
  groups ``"<module>.weight"`` and ``"<module>.bias"`` of blocks of size 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mbf_analysis.errors import UnsupportedModuleError

__all__ = [
    "BlockGroup",
    "LayerLayout",
    "UnsupportedModuleError",
    "SUPPORTED_MODULES",
    "layout_of",
    "model_layouts",
]

LayerKind = Literal["linear", "conv2d", "diagonal"]

_DIAGONAL_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, *_DIAGONAL_TYPES)
"""Modules with parameters that have a mini-block layout."""


@dataclass(frozen=True)
class BlockGroup:
    """A run of equally sized mini-blocks inside one layer's parameter vector.

    Attributes:
        key: Name of the group, e.g. ``"fc1"`` (Linear) or ``"conv1.weight"`` (Conv2d kernels).
        count: Number of mini-blocks ``B``.
        size: Size ``s`` of each mini-block.
        offset: Position of the group's first entry in the layer vector of length ``d``.
    """

    key: str
    count: int
    size: int
    offset: int

    @property
    def numel(self) -> int:
        """``B · s``, the number of parameters the group covers."""
        return self.count * self.size


@dataclass(frozen=True)
class LayerLayout:
    """The mini-block layout of one module's parameters (METHODS.md §2).

    Attributes:
        name: The module's qualified name in the model (``""`` for the model itself).
        kind: ``"linear"``, ``"conv2d"`` or ``"diagonal"``.
        param_names: Qualified names of the module's parameters, weight first.
        param_shapes: Their shapes, in the same order.
        groups: The block groups, in the order they appear in the layer vector.
    """

    name: str
    kind: LayerKind
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    groups: tuple[BlockGroup, ...]

    @property
    def dim(self) -> int:
        """``d``, the layer's parameter count."""
        return sum(g.numel for g in self.groups)

    @property
    def has_bias(self) -> bool:
        """Whether the module has a bias parameter."""
        return len(self.param_names) == 2

    @property
    def block_sizes(self) -> list[int]:
        """The size of every mini-block, in layer-vector order."""
        return [g.size for g in self.groups for _ in range(g.count)]

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into the layer vector in mini-block order.

        Args:
            tensors: Parameter name → tensor of shape ``[*, *param_shape]``; must hold every
                name in :attr:`param_names`.

        Returns:
            ``[*, d]``.
        """
        weight = tensors[self.param_names[0]]
        lead = weight.shape[: weight.dim() - len(self.param_shapes[0])]
        if self.kind == "linear":
            w = weight
            if self.has_bias:
                w = torch.cat([w, tensors[self.param_names[1]].unsqueeze(-1)], dim=-1)
            return w.reshape(*lead, self.dim)
        parts = [tensors[n].reshape(*lead, -1) for n in self.param_names]
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`flatten`.

        Args:
            vector: ``[*, d]``.

        Returns:
            Parameter name → ``[*, *param_shape]``.
        """
        lead = vector.shape[:-1]
        if self.kind == "linear":
            n_out = self.param_shapes[0][0]
            mat = vector.reshape(*lead, n_out, -1)
            out = {self.param_names[0]: mat[..., : self.param_shapes[0][1]]}
            if self.has_bias:
                out[self.param_names[1]] = mat[..., -1]
            return out
        out, start = {}, 0
        for name, shape in zip(self.param_names, self.param_shapes, strict=True):
            numel = int(torch.Size(shape).numel())
            out[name] = vector[..., start : start + numel].reshape(*lead, *shape)
            start += numel
        return out

    def blocks(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a layer vector into its block groups.

        Args:
            vector: ``[*, d]``.

        Returns:
            Group key → ``[*, B, s]`` (a view where the memory layout allows).
        """
        return {
            g.key: vector[..., g.offset : g.offset + g.numel].unflatten(-1, (g.count, g.size))
            for g in self.groups
        }

    def from_blocks(self, blocks: Mapping[str, Tensor]) -> Tensor:
        """Inverse of :meth:`blocks`: ``{key: [*, B, s]}`` → ``[*, d]``."""
        return torch.cat([blocks[g.key].flatten(-2) for g in self.groups], dim=-1)

    def block_slices(self) -> Iterator[slice]:
        """The ``slice`` of every mini-block in the layer vector, in order."""
        for g in self.groups:
            for b in range(g.count):
                start = g.offset + b * g.size
                yield slice(start, start + g.size)

    def block_mask(self, device: torch.device | str | None = None) -> Tensor:
        """Boolean ``[d, d]`` mask that is ``True`` inside the diagonal mini-blocks."""
        ids = torch.repeat_interleave(
            torch.arange(sum(g.count for g in self.groups), device=device),
            torch.tensor(self.block_sizes, device=device),
        )
        return ids[:, None] == ids[None, :]

    def blockdiag(self, blocks: Mapping[str, Tensor]) -> Tensor:
        """Assemble mini-block matrices ``{key: [B, s, s]}`` into a dense ``[d, d]`` matrix."""
        mats = [m for g in self.groups for m in blocks[g.key].unbind(0)]
        return torch.block_diag(*mats)

    def extract_blocks(self, matrix: Tensor) -> dict[str, Tensor]:
        """The diagonal mini-blocks of a dense layer matrix ``[d, d]`` as ``{key: [B, s, s]}``."""
        out = {}
        for g in self.groups:
            sub = matrix[g.offset : g.offset + g.numel, g.offset : g.offset + g.numel]
            sub = sub.reshape(g.count, g.size, g.count, g.size)
            idx = torch.arange(g.count, device=matrix.device)
            out[g.key] = sub[idx, :, idx, :]
        return out


def layout_of(name: str, module: nn.Module) -> LayerLayout:
    """The layout of one module that owns parameters directly.

    Args:
        name: The module's qualified name in its model.
        module: A Linear, Conv2d or normalization module.

    Raises:
        UnsupportedModuleError: For any other module with parameters, naming it and listing the
            supported types.
    """
    prefix = f"{name}." if name else ""
    params = [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None]
    order = {"weight": 0, "bias": 1}
    if any(n not in order for n, _ in params):
        raise UnsupportedModuleError(_unsupported_message(name, module))
    params.sort(key=lambda item: order[item[0]])
    names = tuple(prefix + n for n, _ in params)
    shapes = tuple(tuple(p.shape) for _, p in params)
    has_bias = any(n == "bias" for n, _ in params)

    if isinstance(module, nn.Linear):
        n_out, n_in = module.weight.shape
        group = BlockGroup(name, n_out, n_in + int(has_bias), 0)
        return LayerLayout(name, "linear", names, shapes, (group,))
    if isinstance(module, nn.Conv2d):
        c_out, c_in_per_group, k_h, k_w = module.weight.shape
        kernels = BlockGroup(f"{prefix}weight", c_out * c_in_per_group, k_h * k_w, 0)
        groups = [kernels]
        if has_bias:
            groups.append(BlockGroup(f"{prefix}bias", c_out, 1, kernels.numel))
        return LayerLayout(name, "conv2d", names, shapes, tuple(groups))
    if isinstance(module, _DIAGONAL_TYPES):
        groups, offset = [], 0
        for pname, shape in zip(names, shapes, strict=True):
            numel = int(torch.Size(shape).numel())
            groups.append(BlockGroup(pname, numel, 1, offset))
            offset += numel
        return LayerLayout(name, "diagonal", names, shapes, tuple(groups))
    raise UnsupportedModuleError(_unsupported_message(name, module))


def model_layouts(model: nn.Module) -> dict[str, LayerLayout]:
    """Layouts of every trainable module of ``model``, keyed by module name, in model order.

    Only modules owning at least one parameter with ``requires_grad`` are included.

    Raises:
        UnsupportedModuleError: If a module with parameters has no layout.
    """
    layouts = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            layouts[name] = layout_of(name, module)
    return layouts


def _unsupported_message(name: str, module: nn.Module) -> str:
    supported = ", ".join(t.__name__ for t in SUPPORTED_MODULES)
    return (
        f"module '{name}' ({type(module).__name__}) has parameters but no mini-block layout; "
        f"supported modules with parameters are: {supported}. Replace the module, freeze its "
        "parameters (requires_grad=False), or analyse a model without it."
    )
