"""GPyTorch-style settings: the ``use_lanczos_grad`` flag and the numerical value settings.

Each setting is a lower-case context manager, as in ``gpytorch.settings``::

    import lanczos_grad_gp as lgg
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(16):
        loss = -mll(model(train_x), train_y)   # any exact GP, forward-only Lanczos gradients
        loss.backward()

Unlike ``gpytorch.settings`` (process-global class attributes), the state is **thread-local**:
a context entered in one thread (a BO loop, a data-loader worker) is invisible to the others.
Every setting also has a process-wide default that threads fall back to, changed with
``set_default(value)``. Contexts nest and restore the previous value on exit, also when the
body raises.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._settings_base import _positive_int, _thread_local_flag, _thread_local_value

__all__ = [
    "use_lanczos_grad",
    "max_lanczos_iter",
    "deterministic_max_lanczos_iter",
    "deterministic_dense_size",
    "lanczos_tol",
    "num_probes",
    "probe_seed",
    "max_preconditioner_size",
    "preconditioner_tol",
    "deterministic_preconditioner_tol",
    "reorthogonalize",
    "check_every",
    "fused_kernels",
    "max_dense_kernel_size",
    "preconditioner_override",
    "max_cholesky_size",
    "preconditioner_control_variate",
    "deterministic_objective",
    "current_settings",
]


class use_lanczos_grad(_thread_local_flag):
    """Route every exact-GP marginal likelihood through forward-only Lanczos gradients.

    While on, ``MultivariateNormal.log_prob`` (hence GPyTorch's ``ExactMarginalLogLikelihood``
    and BoTorch's ``fit_gpytorch_mll``) and ``LinearOperator.inv_quad_logdet`` route each
    covariance (:mod:`lanczos_grad_gp.routing`): up to :class:`max_cholesky_size` to GPyTorch's
    exact Cholesky computation, operators with an exact structured formula (diagonal, Kronecker,
    low-rank-plus-diagonal, ...) to their own ``inv_quad_logdet``, everything else to
    :func:`lanczos_grad_gp.inv_quad_logdet`, whatever ``fast_computations`` says. ``record_calls()``
    shows the route of every call. While off, GPyTorch's own code runs unchanged.
    (Default: False)
    """

    def _entered_value(self) -> bool:
        if self._value:  # BoTorch may have been imported after lanczos_grad_gp: wrap its L-BFGS runs now
            _wrap_botorch_runs()
        return self._value

    @classmethod
    def set_default(cls, value: Any) -> None:
        super().set_default(value)
        if cls._default:
            _wrap_botorch_runs()


def _wrap_botorch_runs() -> None:
    from . import botorch_hooks

    botorch_hooks.install_if_imported()


class max_lanczos_iter(_thread_local_value):
    """Maximal number of Lanczos steps per right-hand side / probe in the GP routine. (Default: 100)"""

    _default = 100

    @classmethod
    def _validate(cls, value: Any) -> int:
        return _positive_int(cls.__name__, value)


class deterministic_max_lanczos_iter(max_lanczos_iter):
    """Steps a call of a :class:`deterministic_objective` block may take when it stopped unconverged at
    ``max_lanczos_iter``: it is run again with this cap (a truncated value is biased, and a line search
    follows it). GPyTorch's ``max_cg_iterations`` is 1000 as well. Memory grows with the steps (the Lanczos
    basis, ``8 n m (t + N)`` bytes in float64); a value ``≤ max_lanczos_iter`` turns this off. (Default: 1000)"""

    _default = 1000


class deterministic_dense_size(_thread_local_value):
    """Largest ``n`` at which a :class:`deterministic_objective` block hands a covariance to dense Cholesky when
    one of its calls stops unconverged at ``max_lanczos_iter`` (after the block's factor replacement, where one
    was tried): that call and the block's later calls of the same covariance are computed exactly, as
    GPyTorch's Cholesky does
    (:mod:`lanczos_grad_gp.functions.dense_block`). Up to about this size the factorization costs
    less than the 200+ steps such calls need (measured on CPU; the break-even grows with ``n``). Memory is
    GPyTorch's Cholesky path's: about 14 ``n × n`` matrices with gradients (2.8 GB at 5000 in float64); a batch
    counts with all its matrices. Above it, at 0, or where the factorization fails, the call is run again with
    :class:`deterministic_max_lanczos_iter` steps instead. (Default: 5000)"""

    _default = 5000

    @classmethod
    def _validate(cls, value: Any) -> int:
        return _positive_int(cls.__name__, value, allow_zero=True)


class lanczos_tol(_thread_local_value):
    """Relative function-residual tolerance at which a Lanczos column stops.

    ``None`` means 1e-4 in float64 and 1e-3 in float32. The GP routine reports ``converged`` against
    this tolerance and raises a ``NumericalWarning`` whenever a column does not meet it. ``0`` runs
    ``max_lanczos_iter`` steps without a stopping test (and warns unless they reach round-off). At
    1e-3 in float64 single gradient components were measured off by up to 3% (protein, n = 1500); at
    1e-4 the gradient error stays below the noise of 10 probes.
    (Default: None)
    """

    _default = None

    @classmethod
    def _validate(cls, value: Any) -> float | None:
        if value is None:
            return None
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (0 <= value < 1):
            raise ValueError(f"lanczos_tol must be a float in [0, 1) or None; got {value!r}.")
        return float(value)


class num_probes(_thread_local_value):
    """Number of Rademacher probe vectors for the stochastic log-determinant. (Default: 10)"""

    _default = 10

    @classmethod
    def _validate(cls, value: Any) -> int:
        return _positive_int(cls.__name__, value)


class probe_seed(_thread_local_value):
    """Seed of the probe vectors; ``None`` draws fresh probes from torch's global generator.

    With a seed, the marginal likelihood is a deterministic function of the hyperparameters,
    which L-BFGS (BoTorch's ``fit_gpytorch_mll``) needs. (Default: 0)
    """

    _default = 0

    @classmethod
    def _validate(cls, value: Any) -> int | None:
        if value is None:
            return None
        return _positive_int(cls.__name__, value, allow_zero=True)


class max_preconditioner_size(_thread_local_value):
    """Maximal rank of the preconditioner (0 turns preconditioning off): greedy pivoted Cholesky, or a
    Nyström sketch where that cannot reach its tolerance (``core.preconditioners.select_preconditioner``).

    A rank-k factor costs about ``n k²`` flops (a few Lanczos steps at k = 500, n = 10⁴) and cuts
    the iterations sharply at small noise (docs/mathematics.md, "The GP marginal likelihood"). (Default: 500)"""

    _default = 500

    @classmethod
    def _validate(cls, value: Any) -> int:
        return _positive_int(cls.__name__, value, allow_zero=True)


class preconditioner_tol(_thread_local_value):
    """Stop the pivoted Cholesky when the trace of the remainder ``tr(K - L L^T)`` is below
    ``preconditioner_tol · n · σ²_min`` (σ² the smallest diagonal noise). (Default: 0.01)"""

    _default = 0.01

    @classmethod
    def _validate(cls, value: Any) -> float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
            raise ValueError(f"{cls.__name__} must be a finite float >= 0; got {value!r}.")
        return float(value)


class deterministic_preconditioner_tol(preconditioner_tol):
    """``preconditioner_tol`` in a :class:`deterministic_objective` block, where the cap reaches it. (Default: 1e-4)"""

    _default = 1e-4


class reorthogonalize(_thread_local_flag):
    """Full reorthogonalization in the GP routine's Lanczos (costs O(n m²); speeds convergence
    when ghost Ritz values appear, never needed for stability). (Default: False)"""


class check_every(_thread_local_value):
    """Lanczos steps between convergence checks (each check is one host sync); after 20 checks they
    come every ~5% of the steps taken (still multiples of this number). (Default: 10)"""

    _default = 10

    @classmethod
    def _validate(cls, value: Any) -> int:
        return _positive_int(cls.__name__, value)


class fused_kernels(_thread_local_flag):
    """While ``use_lanczos_grad`` is on, evaluate ``RBFKernel`` / ``MaternKernel`` (ν = ½, 3/2, 5/2),
    optionally inside a ``ScaleKernel``, as :class:`~lanczos_grad_gp.stationary_kernels.StationaryKernelLinearOperator`:
    the kernel matrix is built without an autograd graph and its hyperparameter gradient is computed
    in closed form by row blocks, instead of back-propagating an ``n × n`` gradient through
    GPyTorch's kernel construction. Other kernels are unaffected. (Default: True)"""

    _default = True


class max_dense_kernel_size(_thread_local_value):
    """Largest ``n`` for which a fused stationary kernel keeps its ``n × n`` matrix in memory for the
    Lanczos products (8 n² bytes in float64: 3.2 GB at 20000); above it, row blocks are recomputed
    at every product and memory stays ``O(n · (probes · m + block))``. (Default: 20000)"""

    _default = 20000

    @classmethod
    def _validate(cls, value: Any) -> int:
        return _positive_int(cls.__name__, value, allow_zero=True)


class preconditioner_override(_thread_local_value):
    """A function ``(A, max_rank, trace_tol) -> Preconditioner | None`` that chooses the GP routine's
    preconditioner (the counterpart of linear_operator's ``preconditioner_override``); ``None`` from
    it, or no override, keeps the default pivoted-Cholesky choice. See
    :mod:`lanczos_grad_gp.core.preconditioners` for the protocol. (Default: None)"""

    _default = None

    @classmethod
    def _validate(cls, value: Any) -> Any:
        if value is not None and not callable(value):
            raise ValueError(f"preconditioner_override must be a callable or None; got {value!r}.")
        return value


class max_cholesky_size(_thread_local_value):
    """Largest ``n`` for which the flag leaves the marginal likelihood to GPyTorch's exact Cholesky path.

    Below a few thousand points a dense Cholesky is cheap, exact and deterministic, which is what
    L-BFGS (BoTorch's ``fit_gpytorch_mll``) needs; a stochastic estimate there buys nothing and can
    steer the fit to a worse optimum. ``None`` follows ``gpytorch.settings.max_cholesky_size``
    (800 by default), so code that already tunes GPyTorch's switch keeps its meaning; ``0`` sends
    every size to Lanczos. The chosen route is recorded by ``record_calls()`` (``info.route``).
    A value other than GPyTorch's is applied to the stock call by entering linear_operator's
    ``max_cholesky_size``, which is process-global like all of GPyTorch's settings (not thread-local);
    with ``None`` nothing global is touched. (Default: None)
    """

    _default = None

    @classmethod
    def _validate(cls, value: Any) -> int | None:
        if value is None:
            return None
        return _positive_int(cls.__name__, value, allow_zero=True)

    @classmethod
    def resolved(cls) -> int:
        """The threshold in force: this setting, or GPyTorch's ``max_cholesky_size``."""
        value = cls.value()
        if value is None:
            from linear_operator import settings as lo_settings

            gpytorch_value = lo_settings.max_cholesky_size.value()  # may be math.inf ("always Cholesky")
            return int(gpytorch_value) if math.isfinite(gpytorch_value) else 2**62
        return value


class preconditioner_control_variate(_thread_local_flag):
    """Variance-reduced log-determinant gradient (Wenger et al., ICML 2022): differentiate the
    pivoted-Cholesky preconditioner ``P(θ)`` with its pivots fixed, use ``∂ log det P`` exactly and
    estimate only ``tr(K^{-1}∂K − P^{-1}∂P)`` with the probes (the same probes as the value). With a
    full-rank factor the gradient is exact for any number of probes; costs ``O(n k (k + d))``, about
    one pivoted Cholesky. (Default: True)"""

    _default = True


class deterministic_objective(_thread_local_flag):
    r"""One deterministic, smooth objective per block: what L-BFGS's line search assumes.

    A rank-limited preconditioner and the probes are held fixed per covariance key, so the value is the function
    whose gradient is returned (docs/mathematics.md, "Deterministic objectives"); other factors are rebuilt. A
    call still unconverged at ``max_lanczos_iter`` hands its covariance to dense Cholesky for the rest of the block
    (up to :class:`deterministic_dense_size`) or is run again with :class:`deterministic_max_lanczos_iter` steps.
    Under the flag BoTorch's L-BFGS runs open a block each; each ``with`` opens a new scope. (Default: no scope)
    """

    @classmethod
    def set_default(cls, value: Any) -> None:
        raise TypeError(
            "deterministic_objective has no process-wide default: its scope holds per-fit state and is "
            "thread-local; open it with `with lgg.settings.deterministic_objective(): ...`."
        )

    @classmethod
    def value(cls) -> Any:
        """The scope in force in this thread (a :class:`lanczos_grad_gp.scopes.ObjectiveScope`), or None."""
        return getattr(cls._local, "value", None)

    def _entered_value(self) -> Any:
        from .scopes import ObjectiveScope

        return ObjectiveScope() if self._value else None  # a fresh scope per block, even for a reused object


def current_settings() -> dict[str, Any]:
    """The settings in force in this thread, by name."""
    return {
        cls.__name__: cls.value()
        for cls in (
            use_lanczos_grad,
            max_lanczos_iter,
            deterministic_max_lanczos_iter,
            deterministic_dense_size,
            lanczos_tol,
            num_probes,
            probe_seed,
            max_preconditioner_size,
            preconditioner_tol,
            deterministic_preconditioner_tol,
            reorthogonalize,
            check_every,
            fused_kernels,
            max_dense_kernel_size,
            preconditioner_override,
            max_cholesky_size,
            preconditioner_control_variate,
        )
    }
