"""Shared seeded test matrices and dense float64 oracles for the Lanczos / forward-only gradient tests.

The oracles never touch the library: ``f(A)`` comes from ``torch.linalg.eigh`` in float64, and the
exact derivative of ``u^T f(A) v`` with respect to a symmetric ``A`` is the Daleckii–Krein formula

    ∂/∂A [u^T f(A) v] = U (F ∘ (U^T u)(U^T v)^T) U^T,   A = U diag(λ) U^T,

with the divided differences ``F`` computed here independently: a two-term midpoint series
``f'(c) + f'''(c) h²/24`` (``c`` midpoint, ``h`` gap; next term ``O(h⁴)``) for gaps below ``1e-4`` of
the scale, the plain quotient (cancellation error ``eps·|f|/|h|``) above it. The gradient with respect
to a parameter is then one ``torch.autograd.grad(A(θ), θ, grad_outputs=G)`` — autograd through the
dense construction of ``A``. This works for clustered spectra (kernel matrices), where autograd
through ``eigh`` itself divides by tiny eigenvalue gaps.
"""

from __future__ import annotations

import math

import pytest
import torch

# name -> (f, f', f''', gaps measured relative to |λ|?). Used by the oracles and by the
# divided-difference tests. "custom" is passed to the library as a bare callable (derivative by
# autograd), "custom_pair" as an (f, f') pair.
SCALAR_FUNCTIONS = {
    "log": (torch.log, lambda x: 1 / x, lambda x: 2 / x**3, True),
    "inv": (lambda x: 1 / x, lambda x: -1 / x**2, lambda x: -6 / x**4, True),
    "exp": (torch.exp, torch.exp, torch.exp, False),
    "sqrt": (torch.sqrt, lambda x: 0.5 * x**-0.5, lambda x: 0.375 * x**-2.5, True),
    "invsqrt": (torch.rsqrt, lambda x: -0.5 * x**-1.5, lambda x: -1.875 * x**-3.5, True),
    "custom": (lambda x: x / (1 + x), lambda x: (1 + x) ** -2, lambda x: 6 * (1 + x) ** -4, False),
    "custom_pair": (torch.sin, torch.cos, lambda x: -torch.cos(x), False),
}
BUILTINS = ("log", "inv", "exp", "sqrt", "invsqrt")
ALL_FUNCTIONS = tuple(SCALAR_FUNCTIONS)


def _custom(x):
    return x / (1 + x)


def library_f(name: str):
    """What to pass as ``f`` to the library for an oracle function name."""
    if name == "custom":
        return _custom
    if name == "custom_pair":
        return (torch.sin, torch.cos)
    return name


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def loewner_reference(lam: torch.Tensor, name: str) -> torch.Tensor:
    """Divided-difference matrix of ``name`` at ``lam`` (1-D), computed in float64 without the library."""
    f, df, d3f, relative = SCALAR_FUNCTIONS[name]
    lam = lam.to(torch.float64)
    li, lj = lam[:, None], lam[None, :]
    h = li - lj  # exact for nearby floats (Sterbenz)
    c = 0.5 * (li + lj)
    scale = torch.maximum(li.abs(), lj.abs()) if relative else torch.ones_like(h)
    small = h.abs() <= 1e-4 * scale
    series = df(c) + d3f(c) * h**2 / 24
    fl = f(lam)
    direct = (fl[:, None] - fl[None, :]) / torch.where(small, torch.ones_like(h), h)
    return torch.where(small, series, direct)


def dense_matfunc(A: torch.Tensor, name: str) -> torch.Tensor:
    """``f(A)`` by a float64 eigendecomposition."""
    lam, U = torch.linalg.eigh(A.detach().to(torch.float64))
    return U @ torch.diag(SCALAR_FUNCTIONS[name][0](lam)) @ U.T


def dense_bilinear(A: torch.Tensor, u: torch.Tensor, v: torch.Tensor, name: str):
    """``(u^T f(A) v, ∂/∂A, f(A) v, f(A) u)`` in float64 for a symmetric (n, n) ``A`` and vectors ``u, v``."""
    lam, U = torch.linalg.eigh(A.detach().to(torch.float64))
    u, v = u.detach().to(torch.float64), v.detach().to(torch.float64)
    fl = SCALAR_FUNCTIONS[name][0](lam)
    a, b = U.T @ v, U.T @ u
    value = (b * fl * a).sum()
    G = U @ (loewner_reference(lam, name) * torch.outer(b, a)) @ U.T
    return value, G, U @ (fl * a), U @ (fl * b)


def dense_quad(A: torch.Tensor, v: torch.Tensor, name: str):
    """``(v^T f(A) v, ∂/∂A [v^T f(A) v])`` in float64."""
    value, G, _, _ = dense_bilinear(A, v, v, name)
    return value, G


def spd_matrix(n: int, cond: float, seed: int, dtype=torch.float64, lam_max: float = 1.0):
    """Random-eigenbasis SPD matrix with log-spaced spectrum in ``[lam_max / cond, lam_max]`` (float64 build)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = lam_max * torch.logspace(-math.log10(cond), 0, n, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def rbf_points(n: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64).to(dtype)


def rbf_kernel(x: torch.Tensor, lengthscale: torch.Tensor, noise: float) -> torch.Tensor:
    """Dense RBF kernel ``exp(-|x_i - x_j|² / 2ℓ²) + noise·I`` (differentiable in ``lengthscale``)."""
    sq = (x[:, None, :] - x[None, :, :]).square().sum(-1)
    return torch.exp(-0.5 * sq / lengthscale**2) + noise * torch.eye(x.shape[0], dtype=x.dtype)


def rel_err(x, ref) -> float:
    x, ref = torch.as_tensor(x).detach().to(torch.float64), torch.as_tensor(ref).detach().to(torch.float64)
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


class LinearOperatorDefaults:
    """Mixin for linear_operator's ``LinearOperatorTestCase``: run it under linear_operator's defaults.

    The suite assumes them; importing BoTorch (other test modules do) turns fast computations
    off and raises ``max_cholesky_size`` process-wide.
    """

    def setUp(self) -> None:
        import linear_operator

        self._contexts = [
            linear_operator.settings.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True),
            linear_operator.settings.max_cholesky_size(800),
        ]
        for ctx in self._contexts:
            ctx.__enter__()
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        for ctx in reversed(self._contexts):
            ctx.__exit__(None, None, None)


@pytest.fixture
def lanczos_at_every_size():
    """Route every size to Lanczos under the flag (``max_cholesky_size = 0``), for tests of that path.

    By default the flag leaves ``n <= max_cholesky_size`` (800) to GPyTorch's Cholesky; tests that
    exercise the Lanczos route on small, fast matrices opt in with this fixture.
    """
    import lanczos_grad_gp as lgg

    with lgg.settings.max_cholesky_size(0):
        yield


def gpytorch_feature_flags() -> dict[str, object]:
    """The process-global state of every ``gpytorch.settings`` feature flag (``_state``, None = default)."""
    import gpytorch

    out = {}
    for name in dir(gpytorch.settings):
        cls = getattr(gpytorch.settings, name)
        if isinstance(cls, type) and issubclass(cls, gpytorch.settings._feature_flag) and "_state" in vars(cls):
            out[name] = cls._state
    return out


def restore_gpytorch_feature_flags(saved: dict[str, object]) -> None:
    """Put back the states :func:`gpytorch_feature_flags` returned."""
    import gpytorch

    for name, state in saved.items():
        getattr(gpytorch.settings, name)._state = state


@pytest.fixture(autouse=True)
def _no_leaked_gpytorch_flags():
    """A test must leave GPyTorch's process-global feature flags as it found them.

    (A leaked ``lazily_evaluate_kernels(False)`` silently turns every later model's kernel dense.) A leak
    fails the leaking test, by name, and is undone so that the tests after it see the defaults.
    """
    before = gpytorch_feature_flags()
    yield
    after = gpytorch_feature_flags()
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) is not v}
    restore_gpytorch_feature_flags({k: old for k, (old, _) in changed.items()})
    assert not changed, f"the test left gpytorch.settings feature flags changed (before, after): {changed}"
