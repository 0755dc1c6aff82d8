"""Curvature operators of a PyTorch model's loss for the eigen-utilities (hessian-eigenthings' operators).

* :class:`CurvatureOperator` — the base: a symmetric operator given by batched products ``A V``;
* :class:`HessianOperator` — ``∇²_θ L`` by double backward or torch.func, vectorised over the block;
* :class:`GGNOperator` — the generalised Gauss–Newton ``J^T H_ℓ J`` (the Fisher for canonical losses).

Each has a ``from_loader`` variant that averages over a data loader's batches.
"""

from .averaged import AveragedCurvature, LossFn
from .base import CurvatureOperator
from .ggn import GGNOperator
from .hessian import HessianOperator

__all__ = ["AveragedCurvature", "CurvatureOperator", "GGNOperator", "HessianOperator", "LossFn"]
