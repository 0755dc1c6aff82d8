"""LinearOperators of the package, one per file."""

from .lanczos_grad import LanczosGradLinearOperator

__all__ = ["LanczosGradLinearOperator"]
