"""A seeded random family of symmetric test problems with dense float64 oracles (helper, not a test file).

Shared by ``tests/test_random_family.py`` and ``benchmarks/estimate_coverage.py`` (which puts this
directory on ``sys.path``; tests must not import from ``benchmarks/``). Uses only the public API
``lgg.quad_form`` / ``lgg.bilinear_form``.

A problem (:class:`Case`) is ``A = Q diag(λ) Qᵀ`` (``Q`` from the QR of a seeded Gaussian, built in
float64 and then rounded to the case's dtype), start vectors ``v`` (and ``u`` for bilinear forms),
batch shape ``()``, ``(2,)`` or ``(3,)`` and ``k`` columns, plus the library options. The spectrum:

* positive functions (log, inv, sqrt, invsqrt): ``λ ∈ [10^s / cond, 10^s]``, ``cond`` log-uniform up
  to 1e9 (float64) / 1e5 (float32), overall scale ``10^s``, ``s ∈ [-20, 20]`` / ``[-10, 10]``;
* exp: ``λ = 10^s (log μ + shift)`` with ``μ`` the positive spectrum above for ``cond ≤ e^20``
  (float64) / ``1e5`` (float32), ``shift ∈ [-5, 5]``, ``s ∈ [-20, 0]`` / ``[-10, 0]`` (so that
  ``exp`` never overflows; ``exp(A)`` has condition number ``exp(10^s log cond)``);
* eigenvalue layouts: ``logspaced``, ``random`` (log-uniform), ``linear``, ``clustered`` (1–4
  clusters with relative spread 0, 1e-12, 1e-8 or 1e-4: exact and near repeats) and ``outliers``
  (most eigenvalues at the top, a few at the bottom); both endpoints are always present (n ≥ 2).

Start vectors per column: ``gaussian``, ``ones``, ``unit`` (a coordinate vector) or ``invariant``
(a random combination of 1–3 eigenvectors: the Krylov space is invariant, Lanczos breaks down),
optionally times ``10^t`` (``t ∈ [-3, 3]``); for bilinear forms ``u`` is additionally scaled so that
``‖u‖/‖v‖`` reaches ``10^{±4}``.

Oracles (per column, float64, on exactly the matrix the library sees — the rounded ``A`` promoted
back to float64 — diagonalized by ``torch.linalg.eigh``):

* value ``uᵀ f(A) v = Σ_i b_i f(λ_i) a_i`` with ``a = Sᵀ v``, ``b = Sᵀ u``;
* gradient (Daleckii–Krein) ``∂/∂A = S (F ∘ sym(b aᵀ)) Sᵀ``, ``F_ij = f[λ_i, λ_j]`` the divided
  differences, computed in closed forms that never cancel (``F_ii = f'(λ_i)``; e.g. for log
  ``log1p(h/λ_j)/h`` for close and ``log(λ_i/λ_j)/h`` for distant pairs, ``h = λ_i − λ_j``; for
  inv ``−1/(λ_i λ_j)``; for exp ``e^{(λ_i+λ_j)/2} sinh(h/2)/(h/2)``), so clustered and repeated
  eigenvalues need no threshold. The library's gradient is symmetrized before the comparison.

Error measures (per column):

* ``rel_err``: ``|value − oracle| / scale`` with ``scale = sqrt((uᵀ|f(A)|u)(vᵀ|f(A)|v))`` — for a
  quadratic form ``vᵀ|f(A)|v`` (``= |oracle|`` for positive ``f``). By Cauchy–Schwarz it bounds
  ``|uᵀ f(A) v|``; unlike ``|oracle|`` it does not vanish by cancellation (log near ``A = I``,
  nearly orthogonal ``u, v``), and it exposes precision lost to polarization when ``‖u‖ ≫ ‖v‖``.
* ``grad_err``: ``‖sym(G) − G_oracle‖_F / ‖G_oracle‖_F``, comparable to ``gradient_error_estimate``.
* round-off floors (what a backward-stable method cannot avoid; used as an absolute slack):
  ``value_floor = C·√n·eps·(‖A‖₂‖G‖_* + Σ|a_i b_i f(λ_i)|)`` — first-order change of the value under
  a perturbation ``‖E‖₂ ≤ √n·eps·‖A‖₂`` (``|⟨G, E⟩| ≤ ‖G‖_*‖E‖₂``) plus the rounding of the sum —
  and ``grad_floor = C·√n·eps·(1 + κ)`` relative, ``κ = ‖A‖₂ |f''(λ_min)| / |f'(λ_min)|`` for
  log/inv/sqrt/invsqrt (the condition number of ``f'`` where it is steepest: cond(A) × 1, 2, ½,
  3/2) and, for exp, the ``v``-aware ``κ = ‖A‖₂ max|f''| ‖a‖‖b‖ / ‖G‖_F`` (exp's divided
  differences vary by ``e^{λ_max − λ_min}``, so a ``v`` in the bottom of the spectrum is amplified:
  measured, ``‖A‖₂`` alone under-covers such cases 2000×); ``eps`` of the case's dtype, ``C = FLOOR_C``. ``C`` was
  calibrated with the library in its most accurate mode (full reorthogonalization, ``tol = 0``,
  ``max_iter = n``) on 2000 cases of this family: see ``FLOOR_C``.

``run_case`` calls the library with ``A`` as a leaf tensor, records per column the errors, the
``info`` fields, whether a ``NumericalWarning`` was raised (forward and backward) and any exception.
"""

from __future__ import annotations

import math
import random
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch
from linear_operator.utils.errors import NotPSDError
from linear_operator.utils.warnings import NumericalWarning

import lanczos_grad_gp as lgg

FUNCTIONS = ("log", "inv", "exp", "sqrt", "invsqrt")
DTYPES = ("float64", "float32")
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_TOL = {"float64": 1e-8, "float32": 1e-4}  # lgg.forms.default_tol
MAX_LOG10_COND = {"float64": 9.0, "float32": 5.0}
MAX_EXP_WIDTH = {"float64": 20.0, "float32": math.log(1e5)}  # exp: cond(exp(A)) = e^width
MAX_SCALE = {"float64": 20.0, "float32": 10.0}
LAYOUTS = ("logspaced", "random", "linear", "clustered", "outliers")
STARTS = ("gaussian", "ones", "unit", "invariant")
OTHER_TOLS = {"float64": (1e-4, 1e-6, 1e-10, 1e-12), "float32": (1e-2, 1e-3, 1e-5, 1e-6)}
#: Slack factor of the round-off floors. Calibration: the library in its most accurate mode
#: (reorthogonalize=True, tol=0, max_iter=n) on 2000 quad_form cases of this family (7172 columns,
#: both dtypes, every f, cond up to 1e9): with C = 1 the value error / floor had median 0.05 (f32)
#: / 0.11 (f64), 99th percentile ≤ 1.5 and maximum 3.7; the gradient error / floor median 0.03–0.35,
#: 99th percentile ≤ 4.2, maximum 7.4 (exp, float64; ≤ 2.2 for the other functions; the maxima on
#: small well-conditioned cases, i.e. a few ulps). C = 30 leaves a factor ≥ 4 on the worst measured
#: column. The floor is 30·√n·eps relative (≤ 7e-5 in float32 for n = 400, far below the
#: 100·tol = 1e-2 of a silent failure) except where the conditioning term (cond·eps) makes the
#: requested accuracy unattainable — then it says so, and the library should warn.
FLOOR_C = 30.0
SILENT_FACTOR = 100.0  # a column is a silent failure if rel_err > SILENT_FACTOR * tol and not flagged
COND_BUCKETS = ("<=1e3", "1e3-1e6", ">1e6")


def eps(dtype: str) -> float:
    return torch.finfo(TORCH_DTYPE[dtype]).eps


def cond_bucket(cond: float) -> str:
    if not cond <= 1e3:  # NaN / inf go to the top bucket
        return ">1e6" if not cond <= 1e6 else "1e3-1e6"
    return "<=1e3"


# ---------------------------------------------------------------------------------------------
# The family


@dataclass(frozen=True)
class Case:
    """One problem: everything needed to rebuild it (``build_problem``) and run it (``run_case``)."""

    seed: int  # tensor seed (Q, random eigenvalues, start vectors)
    form: str  # "quad" | "bilinear"
    f: str
    dtype: str
    n: int
    batch: tuple[int, ...] = ()
    k: int = 1
    vector: bool = False  # pass v (and u) as 1-D vectors (batch == (), k == 1)
    layout: str = "logspaced"
    log10_cond: float = 0.0  # requested (positive spectrum μ ∈ [10^-log10_cond, 1])
    cluster_spread: float = 0.0
    scale: float = 0.0  # A multiplied by 10^scale
    shift: float = 0.0  # exp only
    starts: tuple[str, ...] = ("gaussian",)  # per column (v)
    ustarts: tuple[str, ...] = ()  # per column (u), bilinear only
    log10_vnorm: float = 0.0
    log10_uv_ratio: float = 0.0  # bilinear: ‖u‖/‖v‖ ≈ 10^this
    max_iter: int | None = None
    tol: float | None = None
    reorthogonalize: bool = False
    check_every: int = 10

    @property
    def tol_used(self) -> float:
        return DEFAULT_TOL[self.dtype] if self.tol is None else self.tol

    def options(self) -> dict:
        return dict(
            max_iter=self.max_iter, tol=self.tol, reorthogonalize=self.reorthogonalize, check_every=self.check_every
        )

    def short(self) -> str:
        return (
            f"{self.form} f={self.f} {self.dtype} n={self.n} batch={self.batch} k={self.k} layout={self.layout} "
            f"cond=1e{self.log10_cond:.1f} scale=1e{self.scale:+.1f} shift={self.shift:.2f} starts={self.starts} "
            f"ustarts={self.ustarts} vnorm=1e{self.log10_vnorm:+.1f} uv=1e{self.log10_uv_ratio:+.1f} "
            f"max_iter={self.max_iter} tol={self.tol} reorth={self.reorthogonalize} check_every={self.check_every} "
            f"seed={self.seed}"
        )


def random_case(
    rng: random.Random,
    *,
    form: str | None = None,
    f: str | None = None,
    dtype: str | None = None,
    max_n: int = 400,
) -> Case:
    """Draw a :class:`Case` from ``rng`` (a ``random.Random``, or hypothesis' ``st.randoms()``)."""
    form = form or ("bilinear" if rng.random() < 0.2 else "quad")
    f = f or rng.choice(FUNCTIONS)
    dtype = dtype or rng.choice(DTYPES)
    r = rng.random()
    if r < 0.15:
        n = rng.choice([1, 2, 3])
    else:  # log-uniform in [1, max_n]
        n = max(1, min(max_n, round(math.exp(rng.uniform(0.0, math.log(max_n))))))
    batch = rng.choice([(), (), (), (2,), (3,)])
    k = rng.choice([1, 1, 2, 3, 4])
    vector = batch == () and k == 1 and rng.random() < 0.5
    layout = rng.choice(LAYOUTS)
    cluster_spread = rng.choice([0.0, 1e-12, 1e-8, 1e-4]) if layout == "clustered" else 0.0
    if f == "exp":
        log10_cond = rng.uniform(0.0, MAX_EXP_WIDTH[dtype] / math.log(10))
        scale = 0.0 if rng.random() < 0.5 else -rng.uniform(0.0, MAX_SCALE[dtype])
        shift = rng.uniform(-5.0, 5.0)
    else:
        log10_cond = rng.uniform(0.0, MAX_LOG10_COND[dtype])
        scale = 0.0 if rng.random() < 0.25 else rng.uniform(-MAX_SCALE[dtype], MAX_SCALE[dtype])
        shift = 0.0
    start_weights = [0.55, 0.15, 0.1, 0.2]
    starts = tuple(rng.choices(STARTS, start_weights)[0] for _ in range(k))
    ustarts = tuple(rng.choices(STARTS, start_weights)[0] for _ in range(k)) if form == "bilinear" else ()
    log10_vnorm = rng.uniform(-3.0, 3.0) if rng.random() < 0.3 else 0.0
    log10_uv_ratio = rng.uniform(-4.0, 4.0) if form == "bilinear" else 0.0
    mi = rng.random()
    if mi < 0.45:
        max_iter = None
    elif mi < 0.65:
        max_iter = 5
    elif mi < 0.75:
        max_iter = max(1, n // 4)
    else:
        max_iter = 5 * n
    tol = None if rng.random() < 0.75 else rng.choice(OTHER_TOLS[dtype])
    reorthogonalize = rng.random() < 0.15
    check_every = 1 if rng.random() < 0.2 else 10
    seed = rng.randrange(2**31)
    return Case(
        seed=seed, form=form, f=f, dtype=dtype, n=n, batch=batch, k=k, vector=vector, layout=layout,
        log10_cond=log10_cond, cluster_spread=cluster_spread, scale=scale, shift=shift, starts=starts,
        ustarts=ustarts, log10_vnorm=log10_vnorm, log10_uv_ratio=log10_uv_ratio, max_iter=max_iter, tol=tol,
        reorthogonalize=reorthogonalize, check_every=check_every,
    )  # fmt: skip


def family(count: int, seed: int = 0, **kw) -> list[Case]:
    """``count`` cases from one seeded ``random.Random``."""
    rng = random.Random(seed)
    return [random_case(rng, **kw) for _ in range(count)]


def _positive_spectrum(case: Case, g: torch.Generator) -> torch.Tensor:
    """``μ ∈ [10^-log10_cond, 1]`` (n,) float64, sorted ascending, endpoints present for n ≥ 2."""
    n, lc = case.n, case.log10_cond
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    if case.layout == "logspaced":
        x = t
    elif case.layout == "random":
        x = u
    elif case.layout == "linear":  # linear spacing in μ: log10 μ = log10(lo + (1 - lo) u)
        lo = 10.0**-lc
        return torch.sort(torch.cat([torch.tensor([lo, 1.0], dtype=torch.float64), lo + (1 - lo) * u[2:]]))[0]
    elif case.layout == "clustered":
        m = int(torch.randint(1, 5, (1,), generator=g))
        centers = torch.linspace(0.0, 1.0, max(m, 2), dtype=torch.float64)
        which = torch.randint(0, centers.numel(), (n,), generator=g)
        x = centers[which]
        logmu = -lc * (1 - x) + case.cluster_spread / math.log(10) * torch.randn(n, generator=g, dtype=torch.float64)
        logmu = logmu.clamp(-lc, 0.0)
        logmu[0], logmu[-1] = -lc, 0.0
        return torch.sort(10.0**logmu)[0]
    elif case.layout == "outliers":
        few = max(1, n // 10)
        x = torch.cat([u[:few] * 0.3, 0.9 + 0.1 * u[few:]])
    else:
        raise ValueError(case.layout)
    x = x.clone()
    x[0], x[-1] = 0.0, 1.0
    return torch.sort(10.0 ** (-lc * (1 - x)))[0]


@dataclass
class Problem:
    case: Case
    A: torch.Tensor  # (*batch, n, n) case dtype (what the library sees)
    v: torch.Tensor  # (*batch, n, k) case dtype
    u: torch.Tensor | None
    lam: torch.Tensor  # (*batch, n) float64 eigenvalues of A (oracle)
    S: torch.Tensor  # (*batch, n, n) float64 eigenvectors of A (oracle)


def _start(kind: str, n: int, Q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "ones":
        return torch.ones(n, dtype=torch.float64)
    if kind == "unit":
        e = torch.zeros(n, dtype=torch.float64)
        e[int(torch.randint(0, n, (1,), generator=g))] = 1.0
        return e
    if kind == "invariant":
        m = min(n, int(torch.randint(1, 4, (1,), generator=g)))
        idx = torch.randperm(n, generator=g)[:m]
        c = torch.randn(m, generator=g, dtype=torch.float64)
        c = torch.where(c.abs() < 0.1, torch.full_like(c, 0.5), c)
        return Q[:, idx] @ c
    raise ValueError(kind)


def build_problem(case: Case) -> Problem:
    g = torch.Generator().manual_seed(case.seed)
    n, dt = case.n, TORCH_DTYPE[case.dtype]
    nb = math.prod(case.batch)
    As, vs, us = [], [], []
    for _ in range(nb):
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        mu = _positive_spectrum(case, g)
        lam = (mu.log() + case.shift) * 10.0**case.scale if case.f == "exp" else mu * 10.0**case.scale
        M = (Q * lam) @ Q.T
        As.append(0.5 * (M + M.T))  # exactly symmetric, stays so after rounding
        vs.append(torch.stack([_start(s, n, Q, g) for s in case.starts], -1) * 10.0**case.log10_vnorm)
        if case.form == "bilinear":
            u = torch.stack([_start(s, n, Q, g) for s in case.ustarts], -1)
            u = u * (10.0**case.log10_uv_ratio * vs[-1].norm(dim=0) / u.norm(dim=0))
            us.append(u)
    shape = (*case.batch, n)
    A = torch.stack(As).reshape(*shape, n).to(dt)
    v = torch.stack(vs).reshape(*shape, case.k).to(dt)
    u = torch.stack(us).reshape(*shape, case.k).to(dt) if us else None
    lam, S = torch.linalg.eigh(A.to(torch.float64))
    return Problem(case, A, v, u, lam, S)


# ---------------------------------------------------------------------------------------------
# Oracles


def f_values(f: str, lam: torch.Tensor) -> torch.Tensor:
    return {"log": torch.log, "inv": torch.reciprocal, "exp": torch.exp, "sqrt": torch.sqrt, "invsqrt": torch.rsqrt}[f](
        lam
    )


def f_second(f: str, lam: torch.Tensor) -> torch.Tensor:
    return {
        "log": lambda x: -1 / x**2,
        "inv": lambda x: 2 / x**3,
        "exp": torch.exp,
        "sqrt": lambda x: -0.25 * x**-1.5,
        "invsqrt": lambda x: 0.75 * x**-2.5,
    }[f](lam)


def divided_differences(f: str, lam: torch.Tensor) -> torch.Tensor:
    """``F_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j)``, ``F_ii = f'(λ_i)``, ``(..., n, n)`` float64, no cancellation."""
    li, lj = lam[..., :, None], lam[..., None, :]
    h = li - lj
    if f == "inv":
        return -1.0 / (li * lj)
    if f == "sqrt":
        return 1.0 / (li.sqrt() + lj.sqrt())
    if f == "invsqrt":
        si, sj = li.sqrt(), lj.sqrt()
        return -1.0 / (si * sj * (si + sj))
    if f == "exp":
        x = 0.5 * h
        sinhc = torch.where(x == 0, torch.ones_like(x), torch.sinh(x) / torch.where(x == 0, torch.ones_like(x), x))
        return torch.exp(0.5 * (li + lj)) * sinhc
    if f == "log":  # ordered pair (hi ≥ lo) so that F is exactly symmetric
        hi, lo = torch.maximum(li, lj), torch.minimum(li, lj)
        d = hi - lo
        ds = torch.where(d == 0, torch.ones_like(d), d)
        near = torch.log1p(d / lo) / ds  # hi/lo < 2: d exact (Sterbenz), d/lo correctly rounded
        far = torch.log(hi / lo) / ds
        return torch.where(d == 0, 1.0 / lo, torch.where(hi < 2 * lo, near, far))
    raise ValueError(f)


@dataclass
class Oracle:
    value: torch.Tensor  # (nb, k)
    grad: torch.Tensor  # (nb, k, n, n)
    scale: torch.Tensor  # (nb, k) sqrt((u|f|u)(v|f|v))
    value_floor: torch.Tensor  # (nb, k) absolute
    grad_floor: torch.Tensor  # (nb, k) relative
    value_cond: torch.Tensor  # (nb, k) ‖A‖₂‖G‖_*
    value_round: torch.Tensor  # (nb, k) Σ|a_i b_i f(λ_i)|
    grad_cond: torch.Tensor  # (nb, k) κ of the gradient floor (see the module docstring)
    lam_min: torch.Tensor  # (nb,)
    lam_max: torch.Tensor  # (nb,)
    norm_A: torch.Tensor  # (nb,)
    valid: torch.Tensor  # (nb,) f defined on the spectrum
    cond_eff: torch.Tensor  # (nb,) condition number of A (positive f) or of exp(A)


def oracle(p: Problem) -> Oracle:
    case = p.case
    n, k = case.n, case.k
    lam = p.lam.reshape(-1, n)
    S = p.S.reshape(-1, n, n)
    v = p.v.reshape(-1, n, k).to(torch.float64)
    u = v if p.u is None else p.u.reshape(-1, n, k).to(torch.float64)
    a = S.mT @ v  # (nb, n, k)
    b = S.mT @ u
    fl = f_values(case.f, lam)  # (nb, n)
    valid = torch.isfinite(fl).all(-1) & ((lam > 0).all(-1) | (case.f == "exp"))
    F = divided_differences(case.f, lam)  # (nb, n, n)
    value = (b * fl[..., None] * a).sum(-2)  # (nb, k)
    absf = fl.abs()[..., None]
    scale = ((b * b * absf).sum(-2) * (a * a * absf).sum(-2)).sqrt()
    ab = 0.5 * (b.mT[..., :, :, None] * a.mT[..., :, None, :] + a.mT[..., :, :, None] * b.mT[..., :, None, :])
    M = F[:, None] * ab  # (nb, k, n, n) symmetric
    grad = S[:, None] @ M @ S[:, None].mT
    norm_A = lam.abs().amax(-1)
    e = eps(case.dtype)
    nuc = torch.linalg.eigvalsh(M).abs().sum(-1)  # ‖G‖_* = ‖M‖_* (orthogonal invariance)
    gF = torch.linalg.matrix_norm(M)
    value_cond = norm_A[:, None] * nuc  # |⟨G, E⟩| ≤ ‖G‖_*‖E‖₂ for ‖E‖₂ = ‖A‖₂
    value_round = (b * fl[..., None] * a).abs().sum(-2)
    if case.f == "exp":  # v-aware: exp's divided differences vary by e^(λ_max − λ_min) across the spectrum
        d2 = f_second(case.f, lam).abs().amax(-1)
        grad_cond = norm_A[:, None] * d2[:, None] * a.norm(dim=-2) * b.norm(dim=-2) / gF
    else:  # |f'|, |f''| decrease in λ: the condition number of f' at λ_min, ∝ cond(A)
        lmin = lam.amin(-1)
        kappa = norm_A * (f_second(case.f, lmin) / divided_differences(case.f, lmin[:, None])[..., 0, 0]).abs()
        grad_cond = kappa[:, None].expand(-1, k)
    c = FLOOR_C * math.sqrt(n) * e
    value_floor = c * (value_cond + value_round)
    grad_floor = c * (1 + grad_cond)
    lam_min, lam_max = lam.amin(-1), lam.amax(-1)
    if case.f == "exp":
        cond_eff = torch.exp(lam_max - lam_min)
    else:
        cond_eff = torch.where(lam_min > 0, lam_max / lam_min, torch.full_like(lam_min, math.inf))
    return Oracle(
        value,
        grad,
        scale,
        value_floor,
        grad_floor,
        value_cond,
        value_round,
        grad_cond,
        lam_min,
        lam_max,
        norm_A,
        valid,
        cond_eff,
    )


def numerically_not_pd(case: Case, lam_min: float, norm_A: float) -> bool:
    """The smallest eigenvalue is within rounding of zero: ``λ_min ≤ n·eps·‖A‖₂``."""
    return case.f != "exp" and lam_min <= case.n * eps(case.dtype) * norm_A


# ---------------------------------------------------------------------------------------------
# Running the library


@dataclass
class CaseResult:
    case: Case
    columns: list[dict] = field(default_factory=list)
    exception: str | None = None  # forward exception type name
    exception_msg: str | None = None
    grad_exception: str | None = None
    warned: bool = False
    warning_msgs: list[str] = field(default_factory=list)
    other_warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lam_min: list[float] = field(default_factory=list)  # per batch entry (oracle)
    norm_A: list[float] = field(default_factory=list)
    not_pd: bool = False  # some batch entry is numerically not positive definite (numerically_not_pd)


def _f(x) -> float:
    return float(x)


def run_case(case: Case, problem: Problem | None = None) -> CaseResult:
    """Run the library on ``case`` and compare every column with the oracle."""
    p = problem or build_problem(case)
    orc = oracle(p)
    res = CaseResult(case)
    res.lam_min, res.norm_A = orc.lam_min.tolist(), orc.norm_A.tolist()
    res.not_pd = any(numerically_not_pd(case, lm, na) for lm, na in zip(res.lam_min, res.norm_A, strict=True))
    n, k, nb = case.n, case.k, math.prod(case.batch)
    A = p.A.clone().requires_grad_(True)
    v, u = p.v, p.u
    if case.vector:
        v = v.squeeze(-1)
        u = None if u is None else u.squeeze(-1)
    t0 = time.perf_counter()
    value = info = None
    grads: list[torch.Tensor | None] = [None] * k
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.form == "quad":
                value, info = lgg.quad_form(A, v, case.f, return_info=True, **case.options())
            else:
                value, info = lgg.bilinear_form(A, u, v, case.f, return_info=True, **case.options())
        except Exception as exc:  # noqa: BLE001 - recorded and classified by the caller
            res.exception, res.exception_msg = type(exc).__name__, str(exc)[:300]
        if value is not None:
            val2 = value.unsqueeze(-1) if case.vector else value
            try:
                for j in range(k):
                    (gj,) = torch.autograd.grad(val2[..., j].sum(), A, retain_graph=j < k - 1)
                    grads[j] = gj
            except Exception as exc:  # noqa: BLE001
                res.grad_exception = f"{type(exc).__name__}: {str(exc)[:200]}"
                if not isinstance(exc, NotPSDError | ValueError):
                    res.grad_exception += " | " + traceback.format_exc(limit=2)[-300:]
    res.seconds = time.perf_counter() - t0
    for w in caught:
        if issubclass(w.category, NumericalWarning):
            res.warned = True
            res.warning_msgs.append(str(w.message)[:200])
        else:
            res.other_warnings.append(f"{w.category.__name__}: {str(w.message)[:120]}")
    if value is None:
        return res

    def col(t):  # info field -> (nb, k) float64
        t = torch.as_tensor(t).detach()
        if case.vector:
            t = t.unsqueeze(-1)
        return t.reshape(nb, k).to(torch.float64) if t.dtype != torch.bool else t.reshape(nb, k)

    val = col(value)
    fields = {
        name: col(getattr(info, name))
        for name in (
            "iterations", "residual", "relative_residual", "value_error_estimate", "gradient_error_estimate",
            "converged", "broke_down",
        )
    }  # fmt: skip
    for bi in range(nb):
        for j in range(k):
            err = abs(_f(val[bi, j]) - _f(orc.value[bi, j]))
            if not math.isfinite(err):
                err = math.inf
            scale = _f(orc.scale[bi, j])
            rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
            if grads[j] is not None:
                G = grads[j].detach().reshape(nb, n, n)[bi].to(torch.float64)
                G = 0.5 * (G + G.T)
                ref = orc.grad[bi, j]
                rn = _f(torch.linalg.matrix_norm(ref))
                gerr = _f(torch.linalg.matrix_norm(G - ref)) / rn if rn > 0 else _f(torch.linalg.matrix_norm(G))
                if not math.isfinite(gerr):
                    gerr = math.inf
            else:
                gerr = math.nan
            res.columns.append(
                dict(
                    batch_index=bi,
                    column=j,
                    start=case.starts[j],
                    ustart=case.ustarts[j] if case.ustarts else None,
                    oracle_valid=bool(orc.valid[bi]),
                    oracle=_f(orc.value[bi, j]),
                    value=_f(val[bi, j]),
                    scale=scale,
                    abs_err=err,
                    rel_err=rel,
                    grad_err=gerr,
                    value_floor=_f(orc.value_floor[bi, j]),
                    grad_floor=_f(orc.grad_floor[bi, j]),
                    value_cond=_f(orc.value_cond[bi, j]),
                    value_round=_f(orc.value_round[bi, j]),
                    grad_cond=_f(orc.grad_cond[bi, j]),
                    lam_min=_f(orc.lam_min[bi]),
                    lam_max=_f(orc.lam_max[bi]),
                    norm_A=_f(orc.norm_A[bi]),
                    cond_eff=_f(orc.cond_eff[bi]),
                    iterations=int(fields["iterations"][bi, j]),
                    residual=_f(fields["residual"][bi, j]),
                    relative_residual=_f(fields["relative_residual"][bi, j]),
                    value_error_estimate=_f(fields["value_error_estimate"][bi, j]),
                    gradient_error_estimate=_f(fields["gradient_error_estimate"][bi, j]),
                    converged=bool(fields["converged"][bi, j]),
                    broke_down=bool(fields["broke_down"][bi, j]),
                    gradient_rank=int(info.gradient_rank),
                )
            )
    return res


def case_cond(case: Case, result: CaseResult | None = None) -> float:
    """Condition number used for bucketing: of A (positive f) or of exp(A), from the oracle if run."""
    if result is not None and result.columns:
        return max(c["cond_eff"] for c in result.columns)
    if case.f == "exp":
        return math.exp(10.0**case.scale * case.log10_cond * math.log(10))
    return 10.0**case.log10_cond


# ---------------------------------------------------------------------------------------------
# The property: "accurate to the estimate, or warned"

#: Slack on the library's estimates in the per-column property. The estimates are first-order
#: quantities built from Ritz values and ``‖f(T) e_1‖`` in place of the exact spectrum and
#: ``‖f(A) v‖``; a factor 2 absorbs such second-order terms without letting an order-of-magnitude
#: under-estimate through. (The coverage test asks for factor 1 in ≥ 95 % of columns.)
ESTIMATE_SLACK = 2.0


def column_verdict(case: Case, result: CaseResult, colrec: dict | None, c: float = ESTIMATE_SLACK) -> str | None:
    """``None`` if the column satisfies the property, else a one-line reason."""
    if result.exception is not None:
        if result.exception == "NotPSDError":
            return None  # the caller checks genuine non-PD-ness per case (needs the oracle)
        return f"raised {result.exception}: {result.exception_msg}"
    if result.grad_exception is not None:
        return f"backward raised {result.grad_exception}"
    assert colrec is not None
    if not colrec["oracle_valid"]:
        return "returned a value although A is not positive definite (oracle undefined)"
    ok_val = colrec["abs_err"] <= c * colrec["value_error_estimate"] + colrec["value_floor"]
    ok_grad = colrec["grad_err"] <= c * colrec["gradient_error_estimate"] + colrec["grad_floor"]
    if colrec["converged"]:
        if ok_val and ok_grad:
            return None
        return "converged=True but " + ", ".join(
            s
            for s, bad in (
                (
                    f"value error {colrec['abs_err']:.3e} > {c}·estimate {colrec['value_error_estimate']:.3e} "
                    f"+ floor {colrec['value_floor']:.3e}",
                    not ok_val,
                ),
                (
                    f"grad rel. error {colrec['grad_err']:.3e} > {c}·estimate "
                    f"{colrec['gradient_error_estimate']:.3e} + floor {colrec['grad_floor']:.3e}",
                    not ok_grad,
                ),
            )
            if bad
        )
    if result.warned:
        return None
    return (
        f"converged=False and no NumericalWarning (value error {colrec['abs_err']:.3e} vs estimate "
        f"{colrec['value_error_estimate']:.3e}; grad rel. error {colrec['grad_err']:.3e} vs estimate "
        f"{colrec['gradient_error_estimate']:.3e})"
    )


def case_failures(result: CaseResult) -> list[str]:
    """Every violation of the property in one run (empty list: the case passes)."""
    case = result.case
    if result.exception == "NotPSDError":
        if result.not_pd:
            return []
        return [
            f"raised NotPSDError although λ_min = {min(result.lam_min):.3e} > n·eps·‖A‖ "
            f"({case.n * eps(case.dtype) * max(result.norm_A):.3e}): {result.exception_msg}"
        ]
    if result.exception is not None or result.grad_exception is not None:
        return [column_verdict(case, result, None)]
    out = []
    for cr in result.columns:
        why = column_verdict(case, result, cr)
        if why is not None:
            out.append(f"[batch {cr['batch_index']}, column {cr['column']} ({cr['start']})] {why}")
    return out


def reproduction(case: Case) -> str:
    return (
        f'{case.short()}\n  reproduce: cd tests && python -c "import random_family as rf; rf.print_case(rf.{case!r})"'
    )


def print_case(case: Case) -> CaseResult:
    """Run one case and print its per-column comparison (for reproducing failures)."""
    res = run_case(case)
    print(case.short())
    print(f"exception={res.exception} {res.exception_msg or ''} grad_exception={res.grad_exception}")
    print(f"NumericalWarning={res.warned} {res.warning_msgs[:3]}")
    keys = (
        "batch_index", "column", "start", "iterations", "converged", "broke_down", "rel_err", "abs_err",
        "value_error_estimate", "value_floor", "grad_err", "gradient_error_estimate", "grad_floor", "cond_eff",
    )  # fmt: skip
    for cr in res.columns:
        print("  " + " ".join(f"{kk}={cr[kk]:.3e}" if isinstance(cr[kk], float) else f"{kk}={cr[kk]}" for kk in keys))
    for why in case_failures(res):
        print("  FAIL:", why)
    return res


COLUMN_FIELDS = (
    "batch_index", "column", "start", "ustart", "oracle_valid", "oracle", "value", "scale", "abs_err", "rel_err",
    "grad_err", "value_floor", "grad_floor", "value_cond", "value_round", "grad_cond", "lam_min", "lam_max", "norm_A",
    "cond_eff", "iterations", "residual", "relative_residual", "value_error_estimate", "gradient_error_estimate",
    "converged", "broke_down", "gradient_rank",
)  # fmt: skip


def _compact(x):
    return float(f"{x:.6g}") if isinstance(x, float) else x


def result_record(result: CaseResult) -> dict:
    """JSON-serializable record of one run; columns as rows of ``COLUMN_FIELDS`` (floats to 6 digits)."""
    d = asdict(result)
    d["case"] = asdict(result.case)
    d["case"]["tol_used"] = result.case.tol_used
    d["columns"] = [[_compact(c[k]) for k in COLUMN_FIELDS] for c in result.columns]
    d["warning_msgs"] = sorted(set(result.warning_msgs))
    d["other_warnings"] = sorted(set(result.other_warnings))
    return d
