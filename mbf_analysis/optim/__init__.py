"""``torch.optim.Optimizer`` front-ends of the preconditioners in :mod:`mbf_analysis.methods`.

- :class:`MBF`: the Mini-Block Fisher method (Algorithm 2 of the paper) with a bucketed,
  batched fast path and a per-block reference path; :func:`mbf_true_step` runs MBF-True's
  extra sampled-label backward pass;
- :class:`KFAC`: KFAC / KFC with its own forward and backward hooks (empirical or, with
  ``fisher="mc"``, true Fisher); :func:`kfac_true_step` runs its sampled-label backward pass;
- :class:`Shampoo`: Shampoo with EMA statistics;
- :class:`MethodOptimizer`: any method of the registry (:func:`mbf_analysis.methods.names`),
  driven through the method interface, with a KL clip and a Fisher sub-batch for the curvature.

The first three take the same momentum (torch SGD convention), periods ``T1``/``T2`` and
decoupled weight decay; :class:`MethodOptimizer` takes the method's own. All four work with
parameter groups, ``state_dict``, LR schedulers, closures and ``DistributedDataParallel``.
"""

from mbf_analysis.optim.generic import MethodOptimizer
from mbf_analysis.optim.kfac import KFAC, kfac_true_step
from mbf_analysis.optim.mbf import MBF, SpatialAveraging, mbf_true_step
from mbf_analysis.optim.shampoo import Shampoo

__all__ = [
    "KFAC",
    "MBF",
    "MethodOptimizer",
    "Shampoo",
    "SpatialAveraging",
    "kfac_true_step",
    "mbf_true_step",
]
