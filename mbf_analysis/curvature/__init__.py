"""Curvature extraction with BackPACK: per-sample gradients, empirical and true Fisher, and the
one-pass collection of every statistic the preconditioning methods need."""

from mbf_analysis.curvature.collect import (
    DESCRIPTIONS,
    GRAD,
    KFAC_FACTORS,
    KFAC_FACTORS_EXACT,
    KFAC_FACTORS_SAMPLED,
    KRON_SAMPLES,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    PER_SAMPLE_GRAD,
    SAMPLED_GRAD,
    STATISTICS,
    Stats,
    collect,
)
from mbf_analysis.curvature.fisher import (
    FISHER_KINDS,
    FisherKind,
    fisher_rows,
    layer_fisher,
    miniblock_fisher,
    per_sample_grads,
    prepare_batch,
)
from mbf_analysis.curvature.kfac import KronFactors, KronSamples
from mbf_analysis.curvature.losses import Likelihood, likelihood_of
from mbf_analysis.curvature.memory import default_budget

__all__ = [
    "DESCRIPTIONS",
    "GRAD",
    "KFAC_FACTORS",
    "KFAC_FACTORS_EXACT",
    "KFAC_FACTORS_SAMPLED",
    "KRON_SAMPLES",
    "KRON_SAMPLES_EXACT",
    "KRON_SAMPLES_SAMPLED",
    "PER_SAMPLE_GRAD",
    "SAMPLED_GRAD",
    "STATISTICS",
    "KronFactors",
    "KronSamples",
    "Stats",
    "collect",
    "prepare_batch",
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
