r"""Per-sample gradients, and empirical and true Fisher matrices as layer blocks and mini-blocks.

Every Fisher this module computes is written as an average of outer products of *factor rows*
``r``, one set of rows per sample (METHODS.md §1):

.. math::

    F_l = \frac{1}{m} \sum_{n=1}^{m} \sum_{r \in R_n} r_l r_l^\top,

=============  ============================================  ======================================
``kind``       rows ``R_n`` of sample ``n``                  what ``F`` is
=============  ============================================  ======================================
``empirical``  ``g_n = ∇ℓ_n`` (1 row)                        empirical Fisher ``F̃``
``exact``      ``J_nᵀ s_nc``, ``S_n S_nᵀ = H_n`` (C rows)    true Fisher = GGN ``(1/m)ΣJ_nᵀH_nJ_n``
``mc``         ``ĝ_nk / √M``, ``ŷ_nk ~ p(·|x_n)`` (M rows)   Monte-Carlo true Fisher
=============  ============================================  ======================================

``r_l`` is the part of a row belonging to layer ``l``, in the mini-block order of
:mod:`mbf_analysis.layout`. Rows are produced in chunks of samples, so the batch size is limited by
time, not memory; dense ``[d, d]`` blocks are checked against a memory budget before allocation.

Index conventions: ``N`` samples, ``d`` parameters of a layer, ``B`` blocks of size ``s``,
``R`` rows of a chunk (samples × rows per sample).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mbf_analysis.curvature.backend import (
    backward_with,
    check_finite,
    check_model,
    extended,
    is_exact_chain,
)
from mbf_analysis.curvature.footprint import PassFootprint, pass_footprint
from mbf_analysis.curvature.losses import Likelihood, likelihood_of
from mbf_analysis.curvature.memory import (
    check_chunk,
    check_dense,
    chunk_size_for,
    format_bytes,
    resolve_budget,
)
from mbf_analysis.errors import (
    ConfigError,
    MemoryBudgetError,
    UnknownNameError,
    UnsupportedModuleError,
)
from mbf_analysis.fisher_kinds import FISHER_KINDS, check_fisher_kind
from mbf_analysis.layout import LayerLayout
from mbf_analysis.linalg import add_gram_

__all__ = [
    "FisherKind",
    "FISHER_KINDS",
    "per_sample_grads",
    "prepare_batch",
    "fisher_rows",
    "layer_fisher",
    "miniblock_fisher",
]

FisherKind = Literal["empirical", "exact", "mc"]


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next((p for p in model.parameters() if p.requires_grad), None)
    if param is None:
        raise ConfigError("the model has no trainable parameters (requires_grad=True).")
    return param.device, param.dtype


def prepare_batch(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> tuple[Likelihood, Tensor, Tensor]:
    """Check a batch and move it to the model's device and dtype.

    Returns:
        The likelihood of ``loss_fn``, the inputs (floating inputs in the model's dtype) and the
        targets (on the model's device; float targets in its dtype for MSE and BCE).

    Raises:
        ValueError: Mismatched or empty batches, or targets that do not fit the loss.
    """
    likelihood = likelihood_of(loss_fn)
    device, dtype = _model_device_dtype(model)
    if len(inputs) != len(targets):
        raise ConfigError(
            f"inputs and targets differ in batch size: {len(inputs)} vs {len(targets)}."
        )
    if len(inputs) == 0:
        raise ConfigError("empty batch: inputs has no samples.")
    if inputs.is_floating_point():
        inputs = inputs.to(device=device, dtype=dtype)
    else:
        inputs = inputs.to(device)
    probe = torch.empty(0, device=device, dtype=dtype)
    return likelihood, inputs, likelihood.prepare_targets(targets, probe)


def _selected_layouts(
    layouts: dict[str, LayerLayout], layers: Sequence[str] | None
) -> dict[str, LayerLayout]:
    if layers is None:
        return layouts
    missing = [name for name in layers if name not in layouts]
    if missing:
        raise UnknownNameError(
            f"layer(s) {missing} not found among the model's layers with parameters: "
            f"{list(layouts)}."
        )
    return {name: layouts[name] for name in layers}


def per_sample_grads(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients ``g_n = ∇ℓ_n`` of every trainable parameter (unscaled, METHODS §1).

    Args:
        model: A network of supported modules, in eval mode if it holds BatchNorm or Dropout.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` (``ℓ_n = ½‖f - y‖²``) or
            ``nn.BCEWithLogitsLoss``; its ``reduction`` is ignored.
        inputs: ``[N, *in_shape]``.
        targets: ``[N]`` class indices or ``[N, *out_shape]``.
        chunk_size: Samples per BackPACK pass (default: from the memory budget).
        memory_budget: Bytes (default: half the free memory of the model's device).

    Returns:
        Parameter name → ``[N, *param.shape]``.

    Raises:
        MemoryBudgetError: If the result would not fit in the budget.
        NonFiniteError: If a per-sample gradient holds NaN or Inf.
    """
    layouts = check_model(model)
    _check_chunk_size(chunk_size)
    likelihood, inputs, targets = prepare_batch(model, loss_fn, inputs, targets)
    device, dtype = _model_device_dtype(model)
    budget = resolve_budget(memory_budget, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = len(inputs) * n_params * itemsize
    if total > budget:
        raise MemoryBudgetError(
            f"per-sample gradients of {len(inputs)} samples × {n_params} parameters need "
            f"{format_bytes(total)}, over the memory budget of {format_bytes(budget)}. Use "
            "fewer samples, layer_fisher/miniblock_fisher (which stream over the batch), or "
            "raise the budget (memory_budget=..., $MBF_MEMORY_BUDGET)."
        )
    footprint = pass_footprint(
        model, inputs[:1], layouts.values(), rows_per_sample=1, backprop_rows=1, itemsize=itemsize
    )
    chunk = _chunk(len(inputs), footprint, budget - total, chunk_size, fraction=0.5)
    loss_module = likelihood.summed_loss()
    parts: dict[str, list[Tensor]] = {}
    with extended(model, loss_module), torch.enable_grad():
        for start in range(0, len(inputs), chunk):
            stop = min(start + chunk, len(inputs))
            outputs = model(inputs[start:stop])
            loss = loss_module(outputs, targets[start:stop])
            grads = backward_with("batch_grad", model, loss)
            check_finite(grads, "the per-sample gradient", f" (samples {start}..{stop - 1})")
            for name, g in grads.items():
                parts.setdefault(name, []).append(_scaled(g.detach(), likelihood.grad_scale))
    return {
        name: chunks[0] if len(chunks) == 1 else torch.cat(chunks) for name, chunks in parts.items()
    }


def _scaled(tensor: Tensor, scale: float) -> Tensor:
    """``scale · tensor``, in place on a tensor the caller owns; no copy when ``scale == 1``."""
    return tensor if scale == 1.0 else tensor.mul_(scale)


def _chunk(
    n: int, footprint: PassFootprint, budget: int, chunk_size: int | None, *, fraction: float
) -> int:
    """``chunk_size`` if it fits ``budget``, else the largest chunk within ``fraction`` of it."""
    if chunk_size is not None:
        check_chunk(chunk_size, footprint.total, budget, detail=footprint.describe())
        return min(chunk_size, n)
    return chunk_size_for(
        n, footprint.total, budget, fraction=fraction, detail=footprint.describe()
    )


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size}.")


def _rows_per_sample(kind: str, mc_samples: int, n_outputs: int) -> int:
    return {"empirical": 1, "mc": mc_samples, "exact": n_outputs}[kind]


ExactBackend = Literal["auto", "backpack", "output_hessian"]


def fisher_rows(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    kind: FisherKind = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    exact_backend: ExactBackend = "auto",
) -> Iterator[dict[str, Tensor]]:
    """Stream the factor rows of the Fisher, chunk by chunk (see the module docstring).

    Summing ``rowsᵀ rows`` over all chunks and dividing by ``N`` gives the Fisher.

    Args:
        kind: ``"empirical"``, ``"exact"`` or ``"mc"``.
        mc_samples: ``M``, labels drawn per input for ``kind="mc"``.
        generator: Randomness for ``kind="mc"``; labels are drawn for the whole batch up front,
            so results do not depend on ``chunk_size``.
        layers: Module names to keep (default: every trainable module).
        exact_backend: How ``kind="exact"`` gets ``J_nᵀ S_n``: ``"backpack"`` backpropagates
            the square-root factors with BackPACK's ``SqrtGGNExact`` in one pass (a chain of
            supported modules; BCE only with one output); ``"output_hessian"`` runs ``C``
            per-sample-gradient passes of the pseudo-losses ``Σ_n f_nᵀ S_n[:, c]`` with the
            analytic ``S_n`` of :meth:`Likelihood.sqrt_hessian` (any architecture);
            ``"auto"`` takes BackPACK where it applies.

    Yields:
        Module name → ``[R, d]`` rows in the layer's mini-block order.
    """
    check_fisher_kind(kind, "the Fisher kind")
    if mc_samples < 1:
        raise ConfigError(f"mc_samples must be a positive integer, got {mc_samples}.")
    _check_chunk_size(chunk_size)
    layouts = _selected_layouts(check_model(model), layers)
    likelihood, inputs, targets = prepare_batch(model, loss_fn, inputs, targets)
    device, dtype = _model_device_dtype(model)
    budget = resolve_budget(memory_budget, device)
    n = len(inputs)

    with torch.no_grad():
        outputs = model(inputs) if kind == "mc" else model(inputs[:1])
    n_outputs = outputs[0].numel()
    sampled = None
    if kind == "mc":
        sampled = [likelihood.sample_targets(outputs, generator) for _ in range(mc_samples)]
    backpack_exact = is_exact_chain(model) and not (likelihood.kind == "bce" and n_outputs > 1)
    if exact_backend == "backpack" and kind == "exact" and not backpack_exact:
        raise UnsupportedModuleError(
            "BackPACK's SqrtGGNExact needs an nn.Sequential of supported modules (and one output "
            "for BCEWithLogitsLoss); use exact_backend='output_hessian' or 'auto'."
        )
    if exact_backend == "output_hessian":
        backpack_exact = False

    footprint = pass_footprint(
        model,
        inputs[:1],
        layouts.values(),
        rows_per_sample=_rows_per_sample(kind, mc_samples, n_outputs),
        backprop_rows=n_outputs if kind == "exact" and backpack_exact else 1,
        itemsize=torch.empty(0, dtype=dtype).element_size(),
    )
    chunk = _chunk(n, footprint, budget, chunk_size, fraction=0.25)
    loss_module = likelihood.summed_loss()

    # Parameters outside the selected layers are frozen for the pass, so that BackPACK and
    # autograd skip their per-sample work; they are restored however the generator ends.
    selected = {name for layout in layouts.values() for name in layout.param_names}
    frozen = [p for name, p in model.named_parameters() if p.requires_grad and name not in selected]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield from _rows_by_chunk(
            model,
            likelihood,
            loss_module,
            inputs,
            targets,
            layouts,
            kind,
            chunk,
            sampled,
            backpack_exact,
            n_outputs,
            mc_samples,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _rows_by_chunk(
    model: nn.Module,
    likelihood: Likelihood,
    loss_module: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    layouts: dict[str, LayerLayout],
    kind: str,
    chunk: int,
    sampled: list[Tensor] | None,
    backpack_exact: bool,
    n_outputs: int,
    mc_samples: int,
) -> Iterator[dict[str, Tensor]]:
    """The chunk loop of :func:`fisher_rows`: module name → ``[R, d]`` rows per chunk."""
    n = len(inputs)
    with extended(model, loss_module), torch.enable_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            where = f" (samples {start}..{stop - 1})"
            outputs = model(inputs[start:stop])
            if kind == "empirical":
                loss = loss_module(outputs, targets[start:stop])
                grads = backward_with("batch_grad", model, loss)
                check_finite(grads, "the per-sample gradient", where)
                factors = {k: v.unsqueeze(0) for k, v in grads.items()}
                scale = likelihood.grad_scale
            elif kind == "exact" and backpack_exact:
                loss = loss_module(outputs, targets[start:stop])
                factors = backward_with("sqrt_ggn_exact", model, loss)
                check_finite(factors, "the square-root GGN factor", where)
                scale = likelihood.ggn_scale**0.5
            elif kind == "exact":
                roots = likelihood.sqrt_hessian(outputs)
                flat = outputs.flatten(1)
                factors = _stack_passes(
                    model,
                    [(flat * roots[:, :, c]).sum() for c in range(n_outputs)],
                    "the output-Hessian factor",
                    where,
                )
                scale = 1.0
            else:
                losses = [loss_module(outputs, t[start:stop]) for t in sampled]
                factors = _stack_passes(
                    model, losses, "the sampled-label per-sample gradient", where
                )
                scale = likelihood.grad_scale / mc_samples**0.5
            yield {
                name: _scaled(layout.flatten(factors).detach(), scale).flatten(0, 1)
                for name, layout in layouts.items()
            }


def _stack_passes(
    model: nn.Module, losses: list[Tensor], what: str, where: str
) -> dict[str, Tensor]:
    """Per-sample gradients of several losses on one forward graph: name → ``[K, n, *shape]``."""
    passes = []
    for k, loss in enumerate(losses):
        grads = backward_with("batch_grad", model, loss, retain_graph=k < len(losses) - 1)
        check_finite(grads, what, where)
        passes.append(grads)
    return {name: torch.stack([p[name] for p in passes]) for name in passes[0]}


def layer_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    kind: FisherKind = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> dict[str, Tensor]:
    """Dense Fisher block of each layer (weight and bias together), in mini-block order.

    ``F_l = (1/N) Σ_n Σ_{r ∈ R_n} r_l r_lᵀ`` (module docstring); ``kind="empirical"`` gives
    ``F̃_l = (1/N) Σ_n g_{n,l} g_{n,l}ᵀ``. Each chunk's rows are added by
    :func:`~mbf_analysis.linalg.add_gram_` (``F_l += (1/N) rᵀr``, upper block rows computed and
    mirrored: 0.65× the time of a full ``addmm_`` on the paper MLP's 5140² block).

    Args:
        model, loss_fn, inputs, targets: As for :func:`per_sample_grads`.
        kind, mc_samples, generator, layers, chunk_size: As for :func:`fisher_rows`.
        memory_budget: Bytes; the dense blocks are checked against it before allocation.

    Returns:
        Module name → ``[d, d]``.

    Raises:
        MemoryBudgetError: Up front, when the requested blocks would not fit.
    """
    layouts = _selected_layouts(check_model(model), layers)
    device, dtype = _model_device_dtype(model)
    budget = resolve_budget(memory_budget, device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    check_dense({name: layout.dim for name, layout in layouts.items()}, itemsize, budget)
    blocks = {
        name: torch.zeros(layout.dim, layout.dim, device=device, dtype=dtype)
        for name, layout in layouts.items()
    }
    rows_iter = fisher_rows(
        model,
        loss_fn,
        inputs,
        targets,
        kind=kind,
        mc_samples=mc_samples,
        generator=generator,
        layers=list(layouts),
        chunk_size=chunk_size,
        memory_budget=budget // 2,
    )
    for rows in rows_iter:
        for name, r in rows.items():
            add_gram_(blocks[name], r.T, alpha=1.0 / len(inputs))
    return blocks


def miniblock_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    kind: FisherKind = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> dict[str, Tensor]:
    """The diagonal mini-blocks of each layer's Fisher, never forming the dense layer block.

    For block ``b`` of size ``s``: ``F_b = (1/N) Σ_n Σ_{r ∈ R_n} r_b r_bᵀ``.

    Returns:
        Block-group key → ``[B, s, s]``: ``"<module>"`` → ``[n_out, n_in+1, n_in+1]`` for Linear
        (``n_in`` without bias); ``"<module>.weight"`` → ``[C_out·C_in, k_h·k_w, k_h·k_w]`` and
        ``"<module>.bias"`` → ``[C_out, 1, 1]`` for Conv2d; ``"<module>.weight"`` /
        ``"<module>.bias"`` → ``[C, 1, 1]`` for BatchNorm.
    """
    layouts = _selected_layouts(check_model(model), layers)
    device, dtype = _model_device_dtype(model)
    out: dict[str, Tensor] = {}
    rows_iter = fisher_rows(
        model,
        loss_fn,
        inputs,
        targets,
        kind=kind,
        mc_samples=mc_samples,
        generator=generator,
        layers=list(layouts),
        chunk_size=chunk_size,
        memory_budget=memory_budget,
    )
    for rows in rows_iter:
        for name, r in rows.items():
            for key, blocks in layouts[name].blocks(r).items():
                update = torch.einsum("rbi,rbj->bij", blocks, blocks)
                out[key] = out[key] + update if key in out else update
    return {key: value / len(inputs) for key, value in out.items()}
