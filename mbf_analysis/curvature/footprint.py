r"""How many bytes one sample costs in a BackPACK pass, estimated before the pass runs.

The per-sample tensors of :func:`~mbf_analysis.curvature.fisher_rows` and
:func:`~mbf_analysis.curvature.per_sample_grads` are not the only memory a pass needs. For one
sample, with ``itemsize`` bytes per entry, the estimate is

.. math::

    \text{bytes} = \text{itemsize} \cdot \Bigl(2 r d + \tfrac{3}{2} A
        + \tfrac{3}{2} r_b A_{\ge} + \bigl(2 + \tfrac{5}{2} r_b\bigr) U\Bigr),

with these terms:

- ``2 r d``, the factor rows: ``r`` rows (1 empirical, ``M`` Monte-Carlo, ``C`` exact) of the
  ``d`` selected parameters, as BackPACK returns them and as copied into mini-block order.
- ``3/2 A``, the forward pass: ``A`` is the sum of the output sizes of every leaf module, which
  autograd and BackPACK keep with masks and pooling indices.
- ``3/2 r_b A≥``, the backward pass through the leaf modules from the first selected one on
  (``A≥``). ``r_b = C`` when BackPACK's ``SqrtGGNExact`` backpropagates the ``C`` square-root
  columns of the output Hessian together, else 1; BackPACK keeps each module's backpropagated
  factor until the pass ends.
- ``(2 + 5/2 r_b) U``: ``U`` is the unfolded input of the selected Conv2d layers
  (``C_in·k_h·k_w·L_out`` per sample), which BackPACK forms for the weight's per-sample terms
  and broadcasts ``r_b``-fold against the backpropagated factors.

The coefficients are fitted to the growth of the peak RSS over float64 passes on the Simple CNN,
ResNet32, VGG11-BN and the MNIST autoencoder (``benchmarks/bench_footprint.py``, results in
``benchmarks/results_footprint.md``): the estimate is 0.99× to 2.4× the measured cost, within 1%
where the rows dominate and above it elsewhere. On the Simple CNN's ``conv1`` and ``conv2`` with
the exact Fisher the rows are 8 MiB of the 41 MiB a sample needs, which is why sizing the chunks
from the rows alone made the Fashion-MNIST heatmap peak at 9.4 GiB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mbf_analysis.curvature.memory import format_bytes
from mbf_analysis.layout import LayerLayout

__all__ = ["PassFootprint", "pass_footprint"]


@dataclass(frozen=True)
class PassFootprint:
    """Estimated bytes per sample of one pass, by term (module docstring).

    Attributes:
        rows: ``2 r d · itemsize``, the factor rows of the selected layers.
        forward: ``3/2 A · itemsize``, the forward activations.
        backward: ``3/2 r_b A≥ · itemsize``, the backpropagated factors.
        unfold: ``(2 + 5/2 r_b) U · itemsize``, the unfolded Conv2d inputs.
    """

    rows: int
    forward: int
    backward: int
    unfold: int

    @property
    def total(self) -> int:
        """Bytes per sample, all terms."""
        return self.rows + self.forward + self.backward + self.unfold

    def describe(self) -> str:
        """``"63.5 MiB per sample (rows 7.9 MiB, forward 2.1 MiB, ...)"``."""
        parts = ", ".join(
            f"{name} {format_bytes(value)}"
            for name, value in (
                ("factor rows", self.rows),
                ("forward activations", self.forward),
                ("backpropagated factors", self.backward),
                ("unfolded conv inputs", self.unfold),
            )
            if value
        )
        return f"{format_bytes(self.total)} per sample ({parts})"


def _numel(value: object) -> int:
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 0


def _unfold_numel(module: nn.Conv2d, output: Tensor) -> int:
    k_h, k_w = module.kernel_size
    return module.in_channels * k_h * k_w * output[0, 0].numel()


def pass_footprint(
    model: nn.Module,
    sample: Tensor,
    layouts: Iterable[LayerLayout],
    *,
    rows_per_sample: int,
    backprop_rows: int,
    itemsize: int,
) -> PassFootprint:
    """Estimate the bytes one sample needs in a pass over ``layouts`` (module docstring).

    One forward pass of ``sample`` under ``torch.no_grad`` records the output size of every leaf
    module, in execution order, and the unfolded input size of every selected Conv2d layer.

    Args:
        model: The network, in the mode the pass will use.
        sample: ``[1, *in_shape]``, on the model's device and in its dtype.
        layouts: The selected layers.
        rows_per_sample: ``r``, factor rows per sample.
        backprop_rows: ``r_b``, columns backpropagated together (``C`` for BackPACK's
            ``SqrtGGNExact``, 1 for per-sample-gradient passes).
        itemsize: Bytes per entry.

    Returns:
        The estimate, by term.
    """
    layouts = list(layouts)
    selected = {layout.name for layout in layouts}
    order: list[tuple[str, int]] = []
    unfold = 0

    def record(name: str):
        def hook(module: nn.Module, _inputs: object, output: object) -> None:
            nonlocal unfold
            order.append((name, _numel(output)))
            if name in selected and isinstance(module, nn.Conv2d):
                unfold += _unfold_numel(module, output)

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if not any(True for _ in module.children())
    ]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    first = next((i for i, (name, _) in enumerate(order) if name in selected), len(order))
    activations = sum(n for _, n in order)
    after_first = sum(n for _, n in order[first:])
    d = sum(layout.dim for layout in layouts)
    return PassFootprint(
        rows=2 * rows_per_sample * d * itemsize,
        forward=3 * activations * itemsize // 2,
        backward=3 * backprop_rows * after_first * itemsize // 2,
        unfold=(4 + 5 * backprop_rows) * unfold * itemsize // 2,
    )
