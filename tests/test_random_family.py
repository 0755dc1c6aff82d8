"""Error estimates are honest, and nothing fails silently: ``quad_form`` / ``bilinear_form`` on a random family.

The family, the dense float64 oracles (eigh + Daleckii–Krein) and the round-off floors are in
``tests/random_family.py`` (also used by ``python -m benchmarks.estimate_coverage``, which prints the
same measurements as tables for thousands of cases).

1. ``test_accurate_to_estimate_or_warned`` (300 fixed seeds, ``PROPERTY_SEEDS``): for every column
   of every drawn problem, either

   * ``converged`` is True, ``|value − oracle| ≤ c·value_error_estimate + value_floor`` and
     ``‖sym(∂A) − ∂A*‖_F / ‖∂A*‖_F ≤ c·gradient_error_estimate + grad_floor``, with
     ``c = random_family.ESTIMATE_SLACK = 2`` (the estimates are first-order quantities built from
     Ritz values and ``‖f(T)e₁‖``; a factor 2 absorbs second-order terms, not an order of
     magnitude) and the floors what a backward-stable method cannot avoid
     (``C·√n·eps·(‖A‖₂‖∂A*‖_* + Σ|a_i b_i f(λ_i)|)`` absolute for the value — first-order
     sensitivity to a backward error ``‖E‖₂ ≤ √n·eps·‖A‖₂`` plus the rounding of the sum —, and
     ``C·√n·eps·(1 + κ)`` relative for the gradient, ``κ ∝ cond(A)`` (exp: ``v``-aware), ``C = 30``:
     ≥ 4× the worst error the library reaches in its most accurate mode on 7172 columns); or
   * ``converged`` is False and the call raised a ``NumericalWarning`` (forward or backward).

   ``NotPSDError`` is accepted only when the oracle's ``λ_min ≤ n·eps·‖A‖₂`` (numerically not
   positive definite); any other exception, a value for a non-PD matrix, or a backward failure is a
   failure. Each example is reproducible from the printed ``Case`` alone (see
   ``random_family.print_case``).

2. ``test_estimates_cover_true_errors`` (the ≥ 95 % criterion): over a fixed seeded sample of 150
   cases per dtype (n ≤ 200), the estimates plus the round-off floors (factor 1, no slack) cover
   the true value *and* gradient errors in ≥ 95 % of the converged columns.

3. Self-checks of the oracle (so that a failure above is the library's): divided differences
   against the plain quotient and ``f'``, and the Daleckii–Krein gradient against autograd
   through ``torch.linalg.eigh`` on small well-separated spectra.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import random_family as rf
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Matrices here are ≤ 400²: one intra-op thread is as fast, and immune to a busy machine
    (two OpenMP threads on two shared cores were measured 7× slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The sample: fixed seeds, the same in every environment and test order. (It was a derandomized
#: hypothesis search over ``st.integers``; hypothesis biases integers towards constants it harvests
#: from the *loaded* non-test modules, so the drawn seeds changed with which tests had run before:
#: seed 400 was drawn only in a full-suite run. It is kept below as a regression case.)
#: 150 small seeds, 149 spread over 63 bits and 400 (an ``exp`` case whose gradient estimate used to
#: be 3.5× below the true error, ``docs/mathematics.md``, "Which residual to trust").
_SPREAD = random.Random(20261202)
PROPERTY_SEEDS = sorted({*range(150), *(_SPREAD.getrandbits(63) for _ in range(149)), 400})


@pytest.mark.parametrize("chunk", range(6))
def test_accurate_to_estimate_or_warned(chunk):
    # the seed picks the case from the family's own distribution (drawing each parameter from a
    # property-test strategy skews them: measured, 80 % of n ≤ 3, cond mostly < 10)
    violations = []
    for seed in PROPERTY_SEEDS[chunk::6]:
        case = rf.random_case(random.Random(seed))
        result = rf.run_case(case)
        failures = rf.case_failures(result)
        if failures:
            violations.append(
                f"seed {seed}: {len(failures)} column(s) of\n  {rf.reproduction(case)}\n"
                f"  NumericalWarning raised: {result.warned} {result.warning_msgs[:2]}\n    " + "\n    ".join(failures)
            )
    assert not violations, "'accurate to the estimate, or warned' violated:\n" + "\n".join(violations)


COVERAGE_CASES = 150  # per dtype
COVERAGE_SHARE = 0.95
MIN_CONVERGED = 100  # the criterion must not pass vacuously


@pytest.mark.parametrize("dtype", rf.DTYPES)
def test_estimates_cover_true_errors(dtype):
    cases = rf.family(COVERAGE_CASES, seed=20240 + rf.DTYPES.index(dtype), dtype=dtype, max_n=200)
    covered, misses = 0, []
    for case in cases:
        res = rf.run_case(case)
        if res.exception is not None or res.grad_exception is not None:
            continue  # exceptions are test_accurate_to_estimate_or_warned's business
        for cr in res.columns:
            if not cr["converged"]:
                continue
            ok = (
                cr["abs_err"] <= cr["value_error_estimate"] + cr["value_floor"]
                and cr["grad_err"] <= cr["gradient_error_estimate"] + cr["grad_floor"]
            )
            covered += ok
            if not ok:
                misses.append((case, cr))
    total = covered + len(misses)
    assert total >= MIN_CONVERGED, f"only {total} converged columns in the {dtype} sample"
    share = covered / total

    def ratio(err, bound):
        return err / bound if bound > 0 else math.inf

    misses.sort(
        key=lambda m: (
            -max(
                ratio(m[1]["abs_err"], m[1]["value_error_estimate"] + m[1]["value_floor"]),
                ratio(m[1]["grad_err"], m[1]["gradient_error_estimate"] + m[1]["grad_floor"]),
            )
        )
    )
    worst = "\n".join(
        f"  value err {cr['abs_err']:.2e} vs est {cr['value_error_estimate']:.2e} + floor {cr['value_floor']:.1e}; "
        f"grad err {cr['grad_err']:.2e} vs est {cr['gradient_error_estimate']:.2e} + floor {cr['grad_floor']:.1e}; "
        f"column {cr['column']} ({cr['start']}), batch {cr['batch_index']}\n    {rf.reproduction(case)}"
        for case, cr in misses[:5]
    )
    assert share >= COVERAGE_SHARE, (
        f"{dtype}: estimates cover the true error in {100 * share:.1f} % of {total} converged columns "
        f"(< {100 * COVERAGE_SHARE:.0f} %); worst misses:\n{worst}"
    )


# ---------------------------------------------------------------------------------------------
# The oracle itself


@pytest.mark.parametrize("f", rf.FUNCTIONS)
def test_divided_differences_match_quotient_and_derivative(f):
    lam = torch.tensor([0.3, 0.7, 1.0, 1.0 + 1e-9, 2.5, 40.0], dtype=torch.float64)
    F = rf.divided_differences(f, lam)
    fl = rf.f_values(f, lam)
    d = lam[:, None] - lam[None, :]
    far = d.abs() > 1e-3
    quotient = (fl[:, None] - fl[None, :]) / torch.where(far, d, torch.ones_like(d))
    assert torch.allclose(F[far], quotient[far], rtol=1e-12, atol=0)
    x = lam.clone().requires_grad_(True)
    (df,) = torch.autograd.grad(rf.f_values(f, x).sum(), x)
    assert torch.allclose(torch.diagonal(F), df, rtol=1e-14, atol=0)
    assert torch.allclose(F[2, 3], df[2], rtol=1e-8)  # a 1e-9 gap: f' at (nearly) the point, no cancellation
    assert torch.equal(F, F.T)


@pytest.mark.parametrize("f", rf.FUNCTIONS)
@pytest.mark.parametrize("form", ["quad", "bilinear"])
def test_oracle_gradient_matches_autograd_through_eigh(f, form):
    base = rf.Case(seed=7, form=form, f=f, dtype="float64", n=6, k=2, layout="logspaced", log10_cond=1.0,
                   starts=("gaussian", "ones"), ustarts=("gaussian", "unit") if form == "bilinear" else (),
                   shift=0.5 if f == "exp" else 0.0)  # fmt: skip
    p = rf.build_problem(base)
    orc = rf.oracle(p)
    A = p.A.clone().requires_grad_(True)
    for j in range(base.k):
        lam, S = torch.linalg.eigh(0.5 * (A + A.T))
        v = p.v[:, j]
        u = v if p.u is None else p.u[:, j]
        value = (S.T @ u) @ (rf.f_values(f, lam) * (S.T @ v))
        (G,) = torch.autograd.grad(value, A)
        assert torch.allclose(value.detach(), orc.value[0, j], rtol=1e-12)
        assert torch.allclose(G, orc.grad[0, j], rtol=1e-9, atol=1e-12 * float(G.abs().max()))


def test_family_is_seeded_and_covers_its_ranges():
    a, b = rf.family(300, seed=5), rf.family(300, seed=5)
    assert a == b
    assert {c.f for c in a} == set(rf.FUNCTIONS) and {c.dtype for c in a} == set(rf.DTYPES)
    assert {1, 2, 3} <= {c.n for c in a} and max(c.n for c in a) > 200
    assert {c.form for c in a} == {"quad", "bilinear"} and any(c.batch for c in a) and any(c.k > 1 for c in a)
    assert {s for c in a for s in c.starts} == set(rf.STARTS)
    assert {c.max_iter for c in a if c.max_iter is not None and c.max_iter == 5} == {5}
    assert any(c.max_iter == 5 * c.n for c in a) and any(c.max_iter is None for c in a)
    f64 = [c for c in a if c.dtype == "float64" and c.f != "exp"]
    assert max(c.log10_cond for c in f64) > 8 and max(abs(c.scale) for c in f64) > 15
    p = rf.build_problem(dataclasses.replace(a[0], n=5, batch=(2,), k=3, starts=("invariant",) * 3))
    assert torch.equal(p.A, p.A.mT) and p.A.dtype == rf.TORCH_DTYPE[a[0].dtype]
