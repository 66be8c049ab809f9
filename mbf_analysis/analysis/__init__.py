"""Analyses: each returns tidy pandas DataFrames (and matrices), never plots."""

from mbf_analysis.analysis.summary import fisher_summary, miniblock_mass

__all__ = ["fisher_summary", "miniblock_mass"]
