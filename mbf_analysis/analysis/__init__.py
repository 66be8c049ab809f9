"""Analyses: each returns tidy pandas DataFrames (and matrices), never plots."""

from mbf_analysis.analysis.approximation import (
    APPROXIMATED,
    CARRIED,
    DEFAULT_APPROXIMATIONS,
    ERROR_COLUMNS,
    TRAJECTORY_COLUMNS,
    ApproximationConfig,
    ApproximationRun,
    approximation_errors,
    approximation_trajectory,
)
from mbf_analysis.analysis.cosine import (
    COLUMNS,
    DEFAULT_METHODS,
    FULL_COLUMNS,
    NETWORK,
    REFERENCE,
    REFERENCES,
    CosineConfig,
    CosineDivergedError,
    CosineRun,
    cosine_trajectory,
)
from mbf_analysis.analysis.heatmap import InverseHeatmaps, ParameterSubset, inverse_fisher_heatmaps
from mbf_analysis.analysis.summary import fisher_summary, miniblock_mass

__all__ = [
    "APPROXIMATED",
    "CARRIED",
    "DEFAULT_APPROXIMATIONS",
    "ERROR_COLUMNS",
    "TRAJECTORY_COLUMNS",
    "ApproximationConfig",
    "ApproximationRun",
    "approximation_errors",
    "approximation_trajectory",
    "COLUMNS",
    "DEFAULT_METHODS",
    "FULL_COLUMNS",
    "NETWORK",
    "REFERENCE",
    "REFERENCES",
    "CosineConfig",
    "CosineDivergedError",
    "CosineRun",
    "InverseHeatmaps",
    "ParameterSubset",
    "cosine_trajectory",
    "fisher_summary",
    "inverse_fisher_heatmaps",
    "miniblock_mass",
]
