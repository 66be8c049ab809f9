r"""The training problems: data set, network, loss and batch size (paper §6, Appendix 11.2/11.3).

=================  ==============  ============  ================================  =====  =======
problem            data set        model         loss ``ℓ_n`` per sample           ``m``  augment
=================  ==============  ============  ================================  =====  =======
mlp-digits         digits          digits-mlp    cross-entropy                     100    no
mnist-ae           mnist           mnist-ae      ``Σ_pixels BCE(f, x)``            1000   no
fashion-cnn        fashion-mnist   simple-cnn    cross-entropy                     128    no
curves-ae          curves          curves-ae     ``Σ_pixels BCE(f, x)``            1000   no
faces-ae           faces           faces-ae      ``½ ‖f − x‖²`` (summed)           1000   no
resnet32-cifar10   cifar10         resnet32      cross-entropy                     128    yes
vgg16-cifar100     cifar100        vgg16-bn      cross-entropy                     128    yes
vgg11-svhn         svhn            vgg11-bn      cross-entropy                     128    yes
=================  ==============  ============  ================================  =====  =======

**Loss reduction (the convention every preset assumes).** The minibatch loss is the *mean over
samples of the per-sample loss*, ``L = (1/m) Σ_n ℓ_n``, and for the autoencoders ``ℓ_n`` is
*summed over the pixels* (``ℓ_n = Σ_c BCE(f_c, x_c)`` for MNIST and CURVES with a sigmoid output,
``ℓ_n = ½ Σ_c (f_c − x_c)²`` for FACES, METHODS.md §1). This is the convention of Martens (2010)
and Martens & Grosse (2015) that the paper follows ("settings that largely mimic"): it is the only
one under which the paper's numbers hang together. Its Table 4 losses (51.5 – 55.6 on MNIST, 5.2 –
7.2 on FACES) are per-sample sums; a freshly initialized MNIST autoencoder starts at ``L ≈ 543``.
And SGD-m's best learning rate 3e-3 (grid up to 3e-2, which diverges here) only makes sense for
a gradient of this size: under a mean over pixels the gradient is 784 times smaller and 3e-3
would barely move. The classifiers use the usual mean cross-entropy. KFAC also needs the mean
over samples (its ``G`` factor rescales by ``m``).

The paper's batch sizes: 1000 for the autoencoders (§6, "For all algorithms, we used a batch size
of 1,000") and 128 for the CNNs (Appendix 11.3). The CNN problems augment their training batches
with a random crop (zero padding 4, **(choice)**: the paper cites Krizhevsky et al. 2012 without
a size) and a random horizontal flip; the paper applies them to SVHN too, and so do we.
``mlp-digits`` (batch 100) and ``fashion-cnn`` (batch 128) are not in the paper: small problems
of ours for tests and CPU runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbf_analysis.errors import ConfigError
from mbf_analysis.models import ACTIVATIONS

__all__ = [
    "PROBLEMS",
    "Problem",
    "augment_batch",
    "get_problem",
    "problem_names",
]

LossKind = Literal["cross_entropy", "bce_sum", "half_squared_error_sum"]


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """``L = (1/m) Σ_n −log softmax(f_n)_{y_n}``; outputs ``[m, C]``, targets ``[m]``."""
    return F.cross_entropy(outputs, targets)


def _bce_sum(outputs: Tensor, targets: Tensor) -> Tensor:
    """``L = (1/m) Σ_n Σ_c BCE(σ(f_nc), x_nc)``; outputs (logits) and targets ``[m, D]``."""
    return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum") / len(outputs)


def _half_squared_error_sum(outputs: Tensor, targets: Tensor) -> Tensor:
    """``L = (1/m) Σ_n ½ ‖f_n − x_n‖²``; outputs and targets ``[m, D]``."""
    return 0.5 * (outputs - targets).pow(2).sum() / len(outputs)


_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": _cross_entropy,
    "bce_sum": _bce_sum,
    "half_squared_error_sum": _half_squared_error_sum,
}

_LIKELIHOODS: dict[str, type[nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "bce_sum": nn.BCEWithLogitsLoss,
    "half_squared_error_sum": nn.MSELoss,
}


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One training problem.

    Attributes:
        name: Registry name, e.g. ``"mnist-ae"``.
        dataset: Name for :func:`mbf_analysis.data.load_dataset`.
        model: Name for :func:`mbf_analysis.models.build_model`.
        model_kwargs: Extra arguments of the model builder (e.g. ``num_classes=100``).
        loss: ``"cross_entropy"``, ``"bce_sum"`` or ``"half_squared_error_sum"`` (module
            docstring for the formulas).
        batch_size: Minibatch size ``m``.
        augment: Random crop (padding 4) and horizontal flip of the training batches.
        in_paper: Whether the paper runs this problem (else the settings are ours).
    """

    name: str
    dataset: str
    model: str
    model_kwargs: dict[str, object] = field(default_factory=dict)
    loss: LossKind
    batch_size: int
    augment: bool = False
    in_paper: bool = True

    @property
    def is_autoencoder(self) -> bool:
        """Whether the targets are the inputs (flattened) rather than labels."""
        return self.loss != "cross_entropy"

    @property
    def code_activation(self) -> str | None:
        """The activation after an autoencoder's code layer (``None``: a linear code)."""
        value = self.model_kwargs.get("code_activation")
        return None if value is None else str(value)

    @property
    def label(self) -> str:
        """The name for titles and messages: ``"mnist-ae"``, ``"mnist-ae (relu code)"``."""
        activation = self.code_activation
        return self.name if activation is None else f"{self.name} ({activation} code)"

    def with_code_activation(self, activation: str | None) -> Problem:
        """This problem with ``activation`` after its autoencoder's code layer.

        ``None`` returns the problem as registered (a linear code).

        Raises:
            ConfigError: If the problem is not an autoencoder, or the activation is unknown.
        """
        if activation is None:
            return self
        if not self.is_autoencoder:
            raise ConfigError(
                f"problem {self.name!r} is not an autoencoder; a code activation applies to "
                "mnist-ae, curves-ae and faces-ae only"
            )
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown code activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        return replace(self, model_kwargs={**self.model_kwargs, "code_activation": activation})

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The minibatch loss ``L = (1/m) Σ_n ℓ_n`` (module docstring)."""
        return _LOSSES[self.loss](outputs, targets)

    def likelihood_loss(self) -> nn.Module:
        """The loss module naming the predictive distribution ``p(y | f)`` of :attr:`loss`.

        For the true-Fisher statistics (labels sampled from the model,
        :func:`~mbf_analysis.optim.common.sampled_label_loss`, which applies the same per-sample
        scaling as :meth:`loss_fn`): ``nn.CrossEntropyLoss`` (categorical),
        ``nn.BCEWithLogitsLoss`` (independent Bernoulli pixels; summed over pixels, mean over
        samples) or ``nn.MSELoss`` (``N(f, I)``, ``½ ‖f − ŷ‖²`` summed, mean over samples).
        """
        return _LIKELIHOODS[self.loss]()

    def targets(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """``inputs.flatten(1)`` for an autoencoder (``[m, D]``), else ``labels`` (``[m]``)."""
        return inputs.flatten(1) if self.is_autoencoder else labels


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem(
            name="mlp-digits",
            dataset="digits",
            model="digits-mlp",
            loss="cross_entropy",
            batch_size=100,
            in_paper=False,
        ),
        Problem(
            name="mnist-ae", dataset="mnist", model="mnist-ae", loss="bce_sum", batch_size=1000
        ),
        Problem(
            name="fashion-cnn",
            dataset="fashion-mnist",
            model="simple-cnn",
            loss="cross_entropy",
            batch_size=128,
            in_paper=False,
        ),
        Problem(
            name="curves-ae", dataset="curves", model="curves-ae", loss="bce_sum", batch_size=1000
        ),
        Problem(
            name="faces-ae",
            dataset="faces",
            model="faces-ae",
            loss="half_squared_error_sum",
            batch_size=1000,
        ),
        Problem(
            name="resnet32-cifar10",
            dataset="cifar10",
            model="resnet32",
            loss="cross_entropy",
            batch_size=128,
            augment=True,
        ),
        Problem(
            name="vgg16-cifar100",
            dataset="cifar100",
            model="vgg16-bn",
            model_kwargs={"num_classes": 100},
            loss="cross_entropy",
            batch_size=128,
            augment=True,
        ),
        Problem(
            name="vgg11-svhn",
            dataset="svhn",
            model="vgg11-bn",
            loss="cross_entropy",
            batch_size=128,
            augment=True,
        ),
    )
}
"""Registry of the training problems, by name."""


def problem_names() -> list[str]:
    """Names accepted by :func:`get_problem`, in registry order."""
    return list(PROBLEMS)


def get_problem(name: str | Problem) -> Problem:
    """The registered problem ``name`` (a :class:`Problem` is returned as is).

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    if isinstance(name, Problem):
        return name
    if name not in PROBLEMS:
        raise ConfigError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def augment_batch(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop and horizontal flip, independently per image.

    Each image ``[C, H, W]`` is zero-padded by ``padding`` on every side, cropped back to
    ``H × W`` at an offset drawn uniformly from ``{0, …, 2·padding}²``, and mirrored left-right
    with probability ½. The draws come from ``generator`` (CPU), so a seed fixes them.

    Args:
        images: ``[m, C, H, W]``.
        generator: Source of the random offsets and flips.
        padding: Zero padding before the crop.

    Returns:
        A new ``[m, C, H, W]`` tensor.
    """
    m, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (m,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (m,), generator=generator).to(images.device)
    flip = (torch.rand(m, generator=generator) < 0.5).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(m, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]
