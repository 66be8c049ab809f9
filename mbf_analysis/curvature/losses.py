"""Per-sample loss conventions and the predictive distributions behind the true Fisher.

METHODS.md §1: the per-sample loss ``ℓ_n`` is the negative log-likelihood of sample ``n`` under
the model's predictive distribution, and every quantity the toolkit reports uses the unscaled
per-sample gradient ``g_n = ∇ℓ_n`` and the minibatch mean ``L = (1/m) Σ_n ℓ_n``. The loss module a
user passes only selects the likelihood; its ``reduction`` is ignored.

=================  ===========================  =========================  ================
loss module        ``ℓ_n(f, y)``                predictive ``p(ŷ | f)``    ``H_n``
=================  ===========================  =========================  ================
CrossEntropyLoss   ``-log softmax(f)_y``        ``Categorical(softmax f)`` ``diag(p) - ppᵀ``
MSELoss            ``½ ‖f - y‖²`` **(choice)**  ``N(f, I)``                ``I``
BCEWithLogitsLoss  ``Σ_c BCE(f_c, y_c)``        ``Bernoulli(σ(f_c))``      ``diag(σ(1-σ))``
=================  ===========================  =========================  ================

BackPACK is always driven with ``reduction="sum"``, so its ``grad_batch`` is ``g_n`` up to
:attr:`Likelihood.grad_scale` (½ for MSE, whose summed loss is ``Σ ‖f - y‖²``) and its square-root
GGN factors ``S_n`` satisfy ``S_n S_nᵀ = H_n / ggn_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mbf_analysis.errors import ConfigError

__all__ = ["Likelihood", "likelihood_of", "SUPPORTED_LOSSES"]

SUPPORTED_LOSSES: tuple[type[nn.Module], ...] = (
    nn.CrossEntropyLoss,
    nn.MSELoss,
    nn.BCEWithLogitsLoss,
)


@dataclass(frozen=True)
class Likelihood:
    """The likelihood selected by a loss module.

    Attributes:
        kind: ``"cross_entropy"``, ``"mse"`` or ``"bce"``.
        grad_scale: Factor that turns a gradient of BackPACK's summed loss into ``g_n``.
        ggn_scale: Factor that turns BackPACK's summed-loss GGN into ``Σ_n J_nᵀ H_n J_n``.
    """

    kind: str
    grad_scale: float
    ggn_scale: float

    def summed_loss(self) -> nn.Module:
        """A fresh loss module with ``reduction="sum"`` for BackPACK to extend."""
        cls = {
            "cross_entropy": nn.CrossEntropyLoss,
            "mse": nn.MSELoss,
            "bce": nn.BCEWithLogitsLoss,
        }[self.kind]
        return cls(reduction="sum")

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``ℓ_n`` for every sample.

        Args:
            outputs: ``[N, C]`` (or ``[N, *]`` for MSE and BCE).
            targets: ``[N]`` class indices (cross-entropy) or ``outputs``-shaped targets.

        Returns:
            ``[N]``.
        """
        if self.kind == "cross_entropy":
            return nn.functional.cross_entropy(outputs, targets, reduction="none")
        if self.kind == "mse":
            return 0.5 * (outputs - targets).square().flatten(1).sum(1)
        losses = nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return losses.flatten(1).sum(1)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one label per input from the model's predictive distribution ``p(ŷ | f)``.

        Args:
            outputs: ``[N, C]`` network outputs (detached inside).
            generator: Source of randomness on ``outputs.device``, for reproducibility.

        Returns:
            ``[N]`` class indices (cross-entropy) or a tensor shaped like ``outputs``.
        """
        f = outputs.detach()
        if self.kind == "cross_entropy":
            probs = torch.softmax(f, dim=1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if self.kind == "mse":
            noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
            return f + noise
        return torch.bernoulli(torch.sigmoid(f), generator=generator)

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:
        """Square roots ``S_n`` of the output Hessians, ``S_n S_nᵀ = H_n = ∇²_f ℓ_n``.

        - cross-entropy: ``S = diag(√p) - p √pᵀ`` (``Σ p = 1`` makes ``S Sᵀ = diag(p) - ppᵀ``);
        - MSE (``½‖f - y‖²``): ``S = I``;
        - BCE: ``S = diag(√(σ(1-σ)))``.

        Args:
            outputs: ``[N, *]`` network outputs; flattened to ``C`` entries per sample.

        Returns:
            ``[N, C, C]``.
        """
        f = outputs.detach().flatten(1)
        n, c = f.shape
        if self.kind == "cross_entropy":
            p = torch.softmax(f, dim=1)
            root = p.sqrt()
            return torch.diag_embed(root) - p.unsqueeze(2) * root.unsqueeze(1)
        if self.kind == "mse":
            return torch.eye(c, dtype=f.dtype, device=f.device).expand(n, c, c)
        s = torch.sigmoid(f)
        return torch.diag_embed((s * (1 - s)).sqrt())

    def prepare_targets(self, targets: Tensor, like: Tensor) -> Tensor:
        """Targets on ``like``'s device; float targets in its dtype for MSE and BCE."""
        if self.kind == "cross_entropy":
            if targets.is_floating_point():
                raise ConfigError(
                    "CrossEntropyLoss targets must be integer class indices of shape [N]; "
                    "got floating-point targets (class probabilities are not supported)."
                )
            return targets.to(like.device)
        return targets.to(device=like.device, dtype=like.dtype)


def likelihood_of(loss_fn: nn.Module) -> Likelihood:
    """The :class:`Likelihood` that ``loss_fn`` stands for.

    Raises:
        TypeError: For a loss module other than CrossEntropyLoss, MSELoss, BCEWithLogitsLoss.
        ValueError: For options that change the per-sample likelihood (class weights, label
            smoothing, ``pos_weight``), which the Fisher conventions do not cover.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise ConfigError(
                "CrossEntropyLoss with class weights or label smoothing is not supported: the "
                "Fisher needs the plain negative log-likelihood. Use nn.CrossEntropyLoss()."
            )
        return Likelihood("cross_entropy", grad_scale=1.0, ggn_scale=1.0)
    if isinstance(loss_fn, nn.MSELoss):
        return Likelihood("mse", grad_scale=0.5, ggn_scale=0.5)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ConfigError(
                "BCEWithLogitsLoss with weight or pos_weight is not supported: the Fisher needs "
                "the plain Bernoulli negative log-likelihood. Use nn.BCEWithLogitsLoss()."
            )
        return Likelihood("bce", grad_scale=1.0, ggn_scale=1.0)
    names = ", ".join(t.__name__ for t in SUPPORTED_LOSSES)
    raise TypeError(f"unsupported loss {type(loss_fn).__name__}; supported losses: {names}.")
