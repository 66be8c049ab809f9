"""Curvature extraction with BackPACK: per-sample gradients, empirical and true Fisher."""

from mbf_analysis.curvature.fisher import (
    FISHER_KINDS,
    FisherKind,
    fisher_rows,
    layer_fisher,
    miniblock_fisher,
    per_sample_grads,
)
from mbf_analysis.curvature.losses import Likelihood, likelihood_of
from mbf_analysis.curvature.memory import default_budget

__all__ = [
    "FISHER_KINDS",
    "FisherKind",
    "Likelihood",
    "default_budget",
    "fisher_rows",
    "layer_fisher",
    "likelihood_of",
    "miniblock_fisher",
    "per_sample_grads",
]
