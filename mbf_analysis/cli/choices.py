"""The names the command line accepts, known without importing torch.

``mbf-analyze --help`` and every argument error answer from this module, so that they never
import the numerical stack. Each tuple mirrors a registry of the library, in the registry's
order; ``tests/test_cli_startup.py`` checks that they stay equal:

- :data:`DATASETS`: :func:`mbf_analysis.datafiles.dataset_names` (itself torch-free);
- :data:`MODELS`: :func:`mbf_analysis.models.model_names`, and :data:`ACTIVATIONS` the keys of
  :data:`mbf_analysis.models.ACTIVATIONS`;
- :data:`METHODS`: :func:`mbf_analysis.methods.names`;
- :data:`PROBLEMS`: :func:`mbf_analysis.training.problem_names`, and :data:`PROBLEM_DATA` the
  data set of each;
- :data:`OPTIMIZERS`: :data:`mbf_analysis.training.OPTIMIZERS`, and :data:`PRESET_SETS` the keys
  of :data:`mbf_analysis.training.presets.PRESET_SETS`;
- :data:`FISHER_KINDS`: :data:`mbf_analysis.fisher_kinds.FISHER_KINDS` (the one vocabulary);
- :data:`COARSE_SPACES`: :data:`mbf_analysis.methods.two_level.COARSE_SPACES`, and
  :data:`TWO_LEVEL_VARIANT` and :data:`TWO_LEVEL_VARIANTS`:
  :data:`mbf_analysis.methods.TWO_LEVEL_VARIANT` and :func:`mbf_analysis.methods.variants`.
"""

from __future__ import annotations

from mbf_analysis.datafiles import dataset_names
from mbf_analysis.fisher_kinds import FISHER_KINDS

__all__ = [
    "COARSE_SPACES",
    "DATASETS",
    "FISHER_KINDS",
    "METHODS",
    "MODELS",
    "ACTIVATIONS",
    "AUTOENCODERS",
    "OPTIMIZERS",
    "PRESET_SETS",
    "PROBLEMS",
    "PROBLEM_DATA",
    "TWO_LEVEL_VARIANT",
    "TWO_LEVEL_VARIANTS",
]

DATASETS: tuple[str, ...] = tuple(dataset_names())

MODELS: tuple[str, ...] = (
    "digits-mlp",
    "paper-mlp",
    "simple-cnn",
    "mnist-ae",
    "faces-ae",
    "curves-ae",
    "resnet32",
    "vgg11-bn",
    "vgg16-bn",
)

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "elu", "leaky_relu", "selu")

AUTOENCODERS: tuple[str, ...] = ("mnist-ae", "faces-ae", "curves-ae")
"""The problems whose network is an autoencoder (``--code-activation`` applies to them)."""

METHODS: tuple[str, ...] = (
    "sgdm",
    "adam",
    "bdf",
    "mbf",
    "mbf-true",
    "mbf-exact",
    "kfac",
    "shampoo",
    "kpsvd",
    "deflation",
    "lanczos",
    "kfac-corrected",
    "kfac-two-level",
    "ngd",
)

PROBLEM_DATA: dict[str, str] = {
    "mlp-digits": "digits",
    "mnist-ae": "mnist",
    "fashion-cnn": "fashion-mnist",
    "curves-ae": "curves",
    "faces-ae": "faces",
    "resnet32-cifar10": "cifar10",
    "vgg16-cifar100": "cifar100",
    "vgg11-svhn": "svhn",
}

PROBLEMS: tuple[str, ...] = tuple(PROBLEM_DATA)

OPTIMIZERS: tuple[str, ...] = (
    "mbf",
    "adam",
    "sgdm",
    "kfac",
    "shampoo",
    "kfac-koroko",
    "kpsvd",
    "deflation",
    "lanczos",
    "kfac-corrected",
    "kfac-two-level",
    "ngd",
)

PRESET_SETS: tuple[str, ...] = ("ours", "paper")

COARSE_SPACES: tuple[str, ...] = (
    "nicolaides",
    "residual",
    "spectral",
    "krylov-nicolaides",
    "krylov-residual",
    "tselepidis",
)

TWO_LEVEL_VARIANT = "kfac-two-level-{coarse}"
"""The name of two-level KFAC with one coarse space
(:data:`mbf_analysis.methods.TWO_LEVEL_VARIANT`)."""

TWO_LEVEL_VARIANTS: tuple[str, ...] = tuple(
    TWO_LEVEL_VARIANT.format(coarse=c) for c in COARSE_SPACES
)
"""Two-level KFAC with one coarse space, as a method or optimizer name (``--coarse`` expands
``kfac-two-level`` to them)."""
