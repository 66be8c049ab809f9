"""BackPACK as the engine: temporary extension of a model, input checks, one extended backward.

Everything that touches BackPACK's API lives here, so the rest of the package sees plain tensors.
The model is extended only for the duration of a call: the hooks are removed afterwards, so a
training loop that later uses the same model pays nothing for it, and the user's ``.grad``
fields are restored.

**Conv2d and pooling options** (BackPACK 1.7.1; each row is pinned against torch.func in
float64 in ``tests/test_conv_options.py``, for the per-sample gradients, every Fisher kind and
both exact backends):

============================================  ================================================
option                                        handling
============================================  ================================================
``padding=(p_h, p_w)`` (also ``p_h ≠ p_w``)   correct as is
``kernel_size`` non-square, e.g. ``(3, 5)``   correct as is
``stride`` greater than the kernel            correct as is
``dilation``, ``groups`` (depthwise too)      correct as is
``bias=False``                                correct as is
``padding="same"``, ``d·(k − 1)`` even        fixed: BackPACK pads its weight Jacobian for the
                                              wrong kernel (relative error ≈ 1.4), so inside
                                              :func:`extended` the layer gets the integer
                                              padding ``d·(k − 1)/2`` (same forward pass) and
                                              its string back afterwards
``padding="valid"``                           fixed the same way (``(0, 0)``; BackPACK's input
                                              Jacobian fails on the string)
``padding="same"``, ``d·(k − 1)`` odd         refused (asymmetric; no integer equivalent): use
                                              ``nn.ZeroPad2d`` and ``padding=0``
``padding_mode`` reflect/replicate/circular   refused when the padding is non-zero (BackPACK
                                              pads with zeros): use ``nn.ReflectionPad2d`` /
                                              ``ReplicationPad2d`` / ``CircularPad2d`` and
                                              ``padding=0``; harmless with zero padding
``AvgPool2d`` options (in the exact Fisher)   ``ceil_mode``, ``count_include_pad=False`` and
                                              ``divisor_override`` make the model no exact
                                              chain: the exact Fisher takes the output-Hessian
                                              backend (BackPACK is wrong for
                                              ``divisor_override``, fails for the others)
============================================  ================================================

:func:`check_model` refuses the trainable layers of the refused rows, so every entry point does;
a frozen such layer only keeps the model off BackPACK's exact backend (:func:`is_exact_chain`),
since the other paths take its output gradient from autograd.
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

from mbf_analysis.curvature.kfac import conv_padding
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

_PAD_MODULES = {
    "reflect": "nn.ReflectionPad2d",
    "replicate": "nn.ReplicationPad2d",
    "circular": "nn.CircularPad2d",
}
_BACKPACK = "BackPACK's per-sample gradients and Fisher factors"


def _backpack_conv_padding(name: str, module: nn.Conv2d) -> tuple[int, int]:
    """The integer padding ``(p_h, p_w)`` BackPACK must see for ``module`` (module docstring).

    Raises:
        UnsupportedModuleError: For a non-zero padding with ``padding_mode`` other than
            ``"zeros"`` (BackPACK pads the layer input with zeros), and for asymmetric
            ``padding="same"``; the message names the layer and the explicit padding to use.
    """
    pad = tuple(module._reversed_padding_repeated_twice)  # F.pad order: (left, right, top, bottom)
    if module.padding_mode != "zeros" and any(pad):
        raise UnsupportedModuleError(
            f"{_BACKPACK} of module '{name}' (Conv2d with padding_mode={module.padding_mode!r} "
            f"and padding {module.padding!r}) would be wrong: BackPACK pads with zeros. Use "
            f"{_PAD_MODULES[module.padding_mode]}({pad}) before the layer and padding=0, or "
            "padding_mode='zeros'."
        )
    return conv_padding(name, module, what=_BACKPACK)


def _exact_chain_leaf(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        try:
            _backpack_conv_padding("", module)
        except UnsupportedModuleError:
            return False
    if isinstance(module, nn.AvgPool2d) and (
        module.ceil_mode or not module.count_include_pad or module.divisor_override is not None
    ):
        return False
    return isinstance(module, EXACT_CHAIN_MODULES)


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
            per-sample gradient, or a Conv2d layer with an option BackPACK gets wrong (an
            asymmetric ``padding="same"``, a non-zero padding with ``padding_mode`` other than
            ``"zeros"``; module docstring).
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
        if isinstance(module, nn.Conv2d):
            _backpack_conv_padding(name, module)
    return layouts


def is_exact_chain(model: nn.Module) -> bool:
    """Whether BackPACK's ``SqrtGGNExact`` can backpropagate through ``model``.

    It can when the model is a chain (nested ``nn.Sequential``) of :data:`EXACT_CHAIN_MODULES`
    without the options BackPACK gets wrong there (module docstring): a Conv2d layer that
    :func:`check_model` would refuse (possible for a frozen one), or an ``AvgPool2d`` with
    ``ceil_mode``, ``count_include_pad=False`` or ``divisor_override``.
    """
    if isinstance(model, nn.Sequential):
        return all(is_exact_chain(child) for child in model.children())
    return _exact_chain_leaf(model)


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
    A Conv2d layer's string padding is replaced by its integer equivalent for the block
    (:func:`_integer_paddings`); the model's forward pass must run inside the block.
    """
    with _integer_paddings(model), _extended(model, loss_module):
        yield


@contextmanager
def _integer_paddings(model: nn.Module) -> Iterator[None]:
    """Give every Conv2d layer with ``padding="same"`` or ``"valid"`` its integer padding.

    BackPACK 1.7.1 passes ``module.padding`` on to the convolutions of its derivatives: its weight
    Jacobian convolves the layer input with the output gradient, so ``"same"`` pads for the
    output's size instead of the kernel's, and its input Jacobian fails on any string. The
    forward pass is unchanged: ``F.conv2d`` with padding ``p = d·(k − 1)/2`` on both sides is
    what ``"same"`` computes at stride 1. Asymmetric ``"same"`` has no integer equivalent and is
    left as is (refused by :func:`check_model`, kept off the exact backend when frozen). The
    strings are restored on exit, whatever happens in the block.
    """
    saved: dict[nn.Conv2d, str] = {}
    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
                try:
                    padding = conv_padding("", module)
                except UnsupportedModuleError:
                    continue
                saved[module] = module.padding
                module.padding = padding
        yield
    finally:
        for module, padding in saved.items():
            module.padding = padding


@contextmanager
def _extended(model: nn.Module, loss_module: nn.Module) -> Iterator[None]:
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
