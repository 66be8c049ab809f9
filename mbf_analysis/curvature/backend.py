"""BackPACK as the engine: temporary extension of a model, input checks, one extended backward.

Everything that touches BackPACK's API lives here, so the rest of the package sees plain tensors.
The model is extended only for the duration of a call: the hooks are removed afterwards, so a
training loop that later uses the same model pays nothing for it, and the user's ``.grad``
fields are restored.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from backpack import backpack, extend, memory_cleanup
from backpack.context import CTX
from backpack.extensions import BatchGrad, SqrtGGNExact
from torch import Tensor, nn

from mbf_analysis.errors import (
    InplaceModuleError,
    NonFiniteError,
    TrainModeError,
    UnsupportedModuleError,
)
from mbf_analysis.layout import LayerLayout, model_layouts

__all__ = [
    "PER_SAMPLE_MODULES",
    "EXACT_CHAIN_MODULES",
    "check_model",
    "is_exact_chain",
    "check_finite",
    "extended",
    "backward_with",
]

PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
"""Modules with parameters whose per-sample gradients BackPACK's ``BatchGrad`` computes."""

EXACT_CHAIN_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.ELU,
    nn.SELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.ZeroPad2d,
    nn.Dropout,
    nn.Flatten,
    nn.Identity,
)
"""Leaf modules that the exact (square-root GGN) Fisher can backpropagate through."""

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def check_model(model: nn.Module) -> dict[str, LayerLayout]:
    """Refuse models whose per-sample quantities BackPACK cannot compute correctly.

    Returns:
        The layouts of the model's trainable modules.

    Raises:
        InplaceModuleError: A module with ``inplace=True``.
        TrainModeError: BatchNorm or active Dropout in train mode (per-sample gradients are then
            not defined: BatchNorm mixes samples, Dropout draws a new mask per pass). Call
            ``model.eval()`` first.
        UnsupportedModuleError: A module with parameters that has no layout or no BackPACK
            per-sample gradient.
    """
    for name, module in model.named_modules():
        label = f"'{name}' ({type(module).__name__})"
        if getattr(module, "inplace", False):
            raise InplaceModuleError(
                f"module {label} computes in place, which breaks BackPACK's backward hooks; "
                "construct it with inplace=False."
            )
        if module.training and (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            or (isinstance(module, _STOCHASTIC) and module.p > 0)
        ):
            raise TrainModeError(
                f"module {label} is in train mode, where per-sample gradients are not defined "
                "(BatchNorm mixes the samples of a batch; Dropout draws a new mask). Call "
                "model.eval() before extracting curvature."
            )
    layouts = model_layouts(model)
    for name in layouts:
        module = model.get_submodule(name)
        if not isinstance(module, PER_SAMPLE_MODULES):
            supported = ", ".join(t.__name__ for t in PER_SAMPLE_MODULES)
            raise UnsupportedModuleError(
                f"module '{name}' ({type(module).__name__}) has parameters but BackPACK computes "
                f"no per-sample gradients for it; supported: {supported}. Freeze its parameters "
                "(requires_grad=False) or replace the module."
            )
    return layouts


def is_exact_chain(model: nn.Module) -> bool:
    """Whether BackPACK's ``SqrtGGNExact`` can backpropagate through ``model``.

    It can when the model is a chain (nested ``nn.Sequential``) of :data:`EXACT_CHAIN_MODULES`.
    """
    if isinstance(model, nn.Sequential):
        return all(is_exact_chain(child) for child in model.children())
    return isinstance(model, EXACT_CHAIN_MODULES)


def check_finite(values: dict[str, Tensor], what: str, where: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first tensor of ``values`` with NaN or Inf.

    Fast path: NaN and Inf survive a sum, so one reduction per tensor and a single sync decide
    the common all-finite case; only then (or on an overflowing sum) are tensors checked one by
    one, to name the culprit.
    """
    if not values:
        return
    sums = torch.stack([v.sum() for v in values.values()])
    if bool(torch.isfinite(sums).all()):
        return
    for name, value in values.items():
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(
                f"{what} of parameter '{name}' contains NaN or Inf{where}. Check the inputs, "
                "the learning rate and the loss for overflow; no statistic was updated."
            )


@contextmanager
def extended(model: nn.Module, loss_module: nn.Module) -> Iterator[None]:
    """Extend ``model`` and ``loss_module`` with BackPACK for the duration of the block.

    Hooks added here are removed on exit; modules the caller had already extended stay extended.
    The parameters' ``.grad`` fields are saved and restored, so the caller's gradients survive.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    pre_extended = {id(m) for m in model.modules() if getattr(m, "_backpack_extend", False)}
    first_new = len(CTX.hook_handles)
    extend(model)
    extend(loss_module)
    added = CTX.hook_handles[first_new:]
    try:
        yield
    finally:
        for handle in added:
            handle.remove()
        CTX.hook_handles = [h for h in CTX.hook_handles if h not in added]
        for module in model.modules():
            if id(module) not in pre_extended and getattr(module, "_backpack_extend", False):
                delattr(module, "_backpack_extend")
                memory_cleanup(module)
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad
            for attr in ("grad_batch", "sqrt_ggn_exact"):
                if hasattr(p, attr):
                    delattr(p, attr)


def backward_with(
    extension: str, model: nn.Module, loss: Tensor, *, retain_graph: bool = False
) -> dict[str, Tensor]:
    """One backward pass of the scalar ``loss`` with a BackPACK extension.

    Must run inside :func:`extended`, with ``loss`` computed inside it from the model's outputs.

    Args:
        extension: ``"batch_grad"`` (per-sample gradients of a loss that sums per-sample terms)
            or ``"sqrt_ggn_exact"`` (square-root factors of the summed-loss GGN; ``loss`` must
            come from the extended loss module).
        retain_graph: Keep the graph for another backward pass on the same outputs.

    Returns:
        Parameter name → ``[n, *shape]`` (``batch_grad``) or ``[C, n, *shape]``
        (``sqrt_ggn_exact``), for every parameter with ``requires_grad``.
    """
    ext = {"batch_grad": BatchGrad, "sqrt_ggn_exact": SqrtGGNExact}[extension]()
    field = ext.savefield
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    previous_dtype = torch.get_default_dtype()
    # BackPACK's pooling derivatives build helper modules in the default dtype.
    torch.set_default_dtype(loss.dtype)
    try:
        with warnings.catch_warnings(), backpack(ext, retain_graph=retain_graph):
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward(retain_graph=retain_graph)
    finally:
        torch.set_default_dtype(previous_dtype)
    out = {}
    for name, p in params.items():
        value = getattr(p, field, None)
        if value is None:
            raise UnsupportedModuleError(
                f"BackPACK computed no {extension} for parameter '{name}'; its module is not "
                "supported by this extension."
            )
        out[name] = value
        delattr(p, field)
    return out
