"""Analyses: each returns tidy pandas DataFrames (and matrices), never plots."""

from mbf_analysis.analysis.cosine import (
    COLUMNS,
    DEFAULT_METHODS,
    REFERENCE,
    CosineConfig,
    CosineDivergedError,
    CosineRun,
    cosine_trajectory,
)
from mbf_analysis.analysis.heatmap import InverseHeatmaps, ParameterSubset, inverse_fisher_heatmaps
from mbf_analysis.analysis.summary import fisher_summary, miniblock_mass

__all__ = [
    "COLUMNS",
    "DEFAULT_METHODS",
    "REFERENCE",
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
