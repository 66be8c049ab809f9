"""mbf_analysis: curvature analysis of the Mini-Block Fisher method (Bahamou, Goldfarb, Ren)."""

__version__ = "0.1.0"
