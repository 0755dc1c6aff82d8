"""Generate the example notebooks (``notebooks/*.ipynb``) reproducibly, without outputs.

Run from anywhere::

    python notebooks/_make_notebooks.py

Each notebook reads ``LGG_SMOKE=1`` from the environment to shrink problem sizes and step
counts so that ``tests/test_notebooks.py`` can execute it in well under a minute on a CPU.
Edit the cell sources here, never the ``.ipynb`` files by hand.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
import time

import matplotlib.pyplot as plt
import torch

import lanczos_grad_gp as lgg

SMOKE = os.environ.get("LGG_SMOKE", "0") == "1"  # tiny sizes for the test suite
torch.manual_seed(0)
print("smoke mode" if SMOKE else "full mode")"""


def _cells(spec: list[tuple[str, str]]) -> list[nbformat.NotebookNode]:
    cells = []
    for kind, source in spec:
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cells.append(cell)
    return cells


def _notebook(spec: list[tuple[str, str]], stem: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=_cells(spec))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{stem[:2]}-{i:02d}"  # deterministic ids: regenerating gives identical files
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


QUICKSTART = [
    (
        "md",
        """\
# Quickstart: switch an existing GPyTorch model to forward-only Lanczos gradients

`lanczos_grad_gp` adds one flag, `lgg.settings.use_lanczos_grad()`. Inside it, every exact GP's
marginal log likelihood (MLL) — GPyTorch's `ExactMarginalLogLikelihood`, BoTorch's
`fit_gpytorch_mll` — is computed by Lanczos with the *forward-only* gradient of Singh, Barros & Li
(arXiv:2605.12801): the gradient costs one `_bilinear_derivative` call and no extra
matrix-vector products. Nothing in the model changes.

Here we take an ordinary GPyTorch model on the bundled *concrete* data and compare the MLL and
its gradient with exact Cholesky.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
import gpytorch

from lanczos_grad_gp.app.datasets import load_default

data = load_default(n=300 if SMOKE else None)
print(f"{data.name}: {data.num_train} training points, {data.dim} inputs")


class MyGP(gpytorch.models.ExactGP):
    \"\"\"An ordinary GPyTorch exact GP: nothing specific to lanczos_grad_gp.\"\"\"

    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1]))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


likelihood = gpytorch.likelihoods.GaussianLikelihood()
model = MyGP(data.train_x, data.train_y, likelihood).double()
likelihood.noise = 0.05
model.covar_module.base_kernel.lengthscale = 1.5
mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
model.train();""",
    ),
    (
        "md",
        """\
The MLL and its gradient with respect to every hyperparameter, once with exact Cholesky
(`max_cholesky_size` large) and once with the flag on.""",
    ),
    (
        "code",
        """\
def mll_and_grads():
    model.zero_grad()
    start = time.perf_counter()
    value = mll(model(data.train_x), data.train_y)
    value.backward()
    elapsed = time.perf_counter() - start
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return value.item(), grads, elapsed


with gpytorch.settings.max_cholesky_size(10**9):
    mll_and_grads()  # warm-up
    exact_value, exact_grads, exact_time = mll_and_grads()

with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(10 if SMOKE else 30):
    mll_and_grads()  # warm-up
    ours_value, ours_grads, ours_time = mll_and_grads()

print(f"MLL / n  Cholesky {exact_value:.6f}   Lanczos {ours_value:.6f}")
print(f"{'parameter':<45} {'Cholesky':>12} {'Lanczos':>12} {'rel. err':>9}")
for name, g in exact_grads.items():
    err = (ours_grads[name] - g).norm() / g.norm().clamp_min(1e-12)
    print(f"{name:<45} {g.norm():12.5f} {ours_grads[name].norm():12.5f} {err:9.2e}")""",
    ),
    (
        "md",
        """\
The log determinant is a stochastic (Hutchinson) estimate with `num_probes` Rademacher probes,
so the value and the gradient differ from Cholesky by a small, unbiased amount that shrinks like
`1/sqrt(num_probes)`; the `y^T K^{-1} y` part is deterministic. The probes are seeded
(`lgg.settings.probe_seed`), so the objective is a deterministic function of the hyperparameters.
With `num_probes >= n` the probes are the unit vectors and the trace is exact: what is left is
the Lanczos error, controlled by `lgg.settings.lanczos_tol`.""",
    ),
    (
        "code",
        """\
n = data.num_train
print(f"{'num_probes':>10} {'MLL rel. err':>13} {'max grad rel. err':>18}")
for probes in (10, 100, n):
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(probes):
        value, grads, _ = mll_and_grads()
    grad_err = max(((grads[k] - g).norm() / g.norm().clamp_min(1e-12)).item() for k, g in exact_grads.items())
    print(f"{probes:10d} {abs(value - exact_value) / abs(exact_value):13.2e} {grad_err:18.2e}")""",
    ),
    (
        "md",
        """\
Outside the `with` block, GPyTorch runs exactly as before. A few Adam steps under the flag:""",
    ),
    (
        "code",
        """\
optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
losses = []
with lgg.settings.use_lanczos_grad():
    for _ in range(5 if SMOKE else 50):
        optimizer.zero_grad()
        loss = -mll(model(data.train_x), data.train_y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(losses)
ax.set_xlabel("Adam step")
ax.set_ylabel("-MLL / n")
ax.set_title("training under lgg.settings.use_lanczos_grad()")
fig.tight_layout()
print(f"noise {likelihood.noise.item():.4f}, outputscale {model.covar_module.outputscale.item():.4f}")""",
    ),
]


PROTEIN = [
    (
        "md",
        """\
# A larger exact GP: training curves on protein

Exact GP regression (RBF-ARD) on the UCI *protein* data (45 730 × 9; read from `../shared/data`
when present, otherwise the bundled *concrete* set), trained with Adam by three back ends:

- **ours**: forward-only Lanczos gradients (`lgg.settings.use_lanczos_grad()`),
- **gpytorch**: GPyTorch's default iterative path (mBCG + stochastic Lanczos quadrature),
- **cholesky**: exact Cholesky (the reference).

We record the training loss (−MLL/n) at every step and the test RMSE every few steps.
Test predictions are made by Cholesky for all three, so the curves compare the hyperparameters
each method finds. On a CPU only the *ratios* of the times mean anything.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
from lanczos_grad_gp.app.datasets import load_default, load_uci, shared_data_dir
from lanczos_grad_gp.app.training import evaluate, fit_and_evaluate

N = 400 if SMOKE else 5000
STEPS = 4 if SMOKE else 60
EVAL_EVERY = 2 if SMOKE else 5
root = shared_data_dir()
if root is not None and (root / "protein").is_dir():
    data = load_uci("protein", n=N, seed=0)
else:
    print("../shared/data/uci/protein not found: using the bundled concrete data")
    data = load_default(n=min(N, 1030), seed=0)
print(f"{data.name}: {data.num_train} train / {data.num_test} test points, d = {data.dim}")""",
    ),
    (
        "code",
        """\
runs = {}
for method in ("ours", "gpytorch", "cholesky"):
    curve = {"step": [], "rmse": []}

    def record(step, loss, model, curve=curve):
        if step % EVAL_EVERY == 0 or step == STEPS - 1:
            curve["step"].append(step)
            curve["rmse"].append(evaluate(model, data.test_x, data.test_y, y_mean=data.y_mean, y_std=data.y_std).rmse)

    result = fit_and_evaluate(data, method, steps=STEPS, lr=0.1, progress=False, callback=record)
    result.history.update(curve)
    runs[method] = result
    print(
        f"{method:>9}: {1e3 * result.time_per_step:8.1f} ms/step   test RMSE {result.metrics.rmse:.4f}   "
        f"NLL {result.metrics.nll:.4f}   noise {result.hyperparameters['noise']:.4f}"
    )""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for method, result in runs.items():
    axes[0].plot(result.losses, label=method)
    axes[1].plot(result.history["step"], result.history["rmse"], marker="o", label=method)
axes[0].set(xlabel="Adam step", ylabel="-MLL / n", title="training loss")
axes[1].set(xlabel="Adam step", ylabel="test RMSE", title="test RMSE (Cholesky predictions)")
names = list(runs)
axes[2].bar(names, [1e3 * runs[m].time_per_step for m in names], color=["C0", "C1", "C2"])
axes[2].set(ylabel="ms per step", title="time per training step")
for ax in axes[:2]:
    ax.legend()
fig.tight_layout()""",
    ),
    (
        "md",
        """\
The loss curves of **ours** and **cholesky** lie on top of each other up to the Monte-Carlo
noise of the log-determinant estimate. For timings that mean something, run the benchmarks on a
GPU with `N` in the tens of thousands (Cholesky then runs out of memory or time first).""",
    ),
]


BOTORCH = [
    (
        "md",
        """\
# Bayesian optimisation with BoTorch under the flag

BoTorch fits its models with `fit_gpytorch_mll` (L-BFGS on the exact MLL). Inside
`lgg.settings.use_lanczos_grad()` that fit uses forward-only Lanczos gradients; the probe
vectors are seeded, so L-BFGS sees a deterministic objective. Here: a small BO loop on the
Branin function with `LogExpectedImprovement` and `optimize_acqf`, once with the flag and once
with BoTorch's default (Cholesky at these sizes).""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
import contextlib

from botorch.acquisition import LogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from botorch.test_functions import Branin
from botorch.utils.sampling import draw_sobol_samples
from gpytorch.mlls import ExactMarginalLogLikelihood

problem = Branin(negate=True).to(dtype=torch.float64)  # BoTorch maximises
N_INIT = 6 if SMOKE else 10
N_ITER = 3 if SMOKE else 25
ACQF = dict(num_restarts=2 if SMOKE else 10, raw_samples=32 if SMOKE else 512)


def bo_loop(use_ours: bool, seed: int = 0):
    x = draw_sobol_samples(bounds=problem.bounds, n=N_INIT, q=1, seed=seed).squeeze(-2)
    y = problem(x).unsqueeze(-1)
    best = [y.max().item()]
    fit_time, lanczos_calls = 0.0, 0
    for _ in range(N_ITER):
        model = SingleTaskGP(x, y, input_transform=Normalize(d=2), outcome_transform=Standardize(m=1))
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        flag = lgg.settings.use_lanczos_grad() if use_ours else contextlib.nullcontext()
        start = time.perf_counter()
        with flag, lgg.record_calls() as calls:  # record_calls: every call of our GP routine
            fit_gpytorch_mll(mll)
        fit_time += time.perf_counter() - start
        lanczos_calls += len(calls)
        acqf = LogExpectedImprovement(model, best_f=y.max())
        candidate, _ = optimize_acqf(acqf, bounds=problem.bounds, q=1, **ACQF)
        x = torch.cat([x, candidate])
        y = torch.cat([y, problem(candidate).unsqueeze(-1)])
        best.append(y.max().item())
    return best, fit_time, lanczos_calls, model""",
    ),
    (
        "code",
        """\
best_ours, time_ours, calls_ours, model_ours = bo_loop(use_ours=True)
best_default, time_default, calls_default, model_default = bo_loop(use_ours=False)
print(f"best found: ours {best_ours[-1]:.4f}, default {best_default[-1]:.4f}, optimum {problem.optimal_value:.4f}")
print(f"total fit time: ours {time_ours:.2f} s, default {time_default:.2f} s")
print(f"MLL evaluations by forward-only Lanczos: ours {calls_ours}, default {calls_default}")
ls = model_ours.covar_module.lengthscale.detach().squeeze()
print("last model (ours): lengthscales", [round(v, 3) for v in ls.tolist()])""",
    ),
    (
        "code",
        """\
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(best_ours, marker="o", label="fit under use_lanczos_grad")
ax.plot(best_default, marker="s", ls="--", label="BoTorch default fit")
ax.axhline(problem.optimal_value, color="k", lw=0.8, label="optimum")
ax.set(xlabel="BO iteration", ylabel="best observed (negated Branin)", title="Branin, LogEI")
ax.legend()
fig.tight_layout()""",
    ),
    (
        "md",
        """\
With a few dozen points the flag brings no speed — Cholesky is cheap there — but it shows that
the fit, the acquisition function and the optimiser work unchanged. The flag pays off for
models with thousands of training points (high-throughput BO, multi-fidelity data).""",
    ),
]


ACCURACY = [
    (
        "md",
        r"""\
# Gradient accuracy versus the Lanczos residual

The central claim of Singh, Barros & Li (arXiv:2605.12801): the error of the forward-only
gradient of $v^\top f(A(\theta))\,v$ is proportional to the Lanczos residual — the same quantity
that controls the error of the value — *without* reorthogonalization, also after the Lanczos
basis has lost orthogonality.

We test it on an RBF kernel matrix $K(\ell) = \exp(-\|x_i-x_j\|^2 / 2\ell^2) + \sigma^2 I$ on the
concrete inputs, with the lengthscale $\ell$ as parameter, for $f = \log$ and $f = 1/x$, with and
without full reorthogonalization, in float32 and float64. The oracle is dense float64:
$\partial_\ell\, v^\top f(K) v = \sum_{ij} F_{ij}\,(U^\top v)_i (U^\top v)_j\,(U^\top \partial_\ell K\, U)_{ij}$
with $K = U \Lambda U^\top$ and $F$ the divided differences of $f$ at the eigenvalues
(Daleckii–Krein).""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
from lanczos_grad_gp.app.datasets import load_default

N = 150 if SMOKE else 600
NOISE = 1e-2
data = load_default(n=N, test_fraction=0.0)
X = data.train_x
sqdist = torch.cdist(X, X).pow(2)
v0 = data.train_y / data.train_y.norm() * N**0.5  # a data-like start vector


def kernel(ell, dtype=torch.float64):
    d = sqdist.to(dtype)
    return torch.exp(-d / (2 * ell**2)) + NOISE * torch.eye(N, dtype=dtype)


def oracle(f, ell0):
    \"\"\"Exact value and d/d ell of v^T f(K(ell)) v by eigendecomposition (float64).\"\"\"
    K = kernel(torch.tensor(ell0, dtype=torch.float64))
    dK = torch.exp(-sqdist / (2 * ell0**2)) * sqdist / ell0**3
    lam, U = torch.linalg.eigh(K)
    a = U.T @ v0
    li, lj = lam[:, None], lam[None, :]
    diff = li - lj
    if f == "log":
        fl = lam.log()
        close = diff.abs() <= 1e-8 * lj
        F = torch.where(close, 2 / (li + lj), torch.log1p(diff / lj) / torch.where(close, 1.0, diff))
    else:
        fl = 1 / lam
        F = -1 / (li * lj)
    value = (a**2 * fl).sum()
    grad = (F * torch.outer(a, a) * (U.T @ dK @ U)).sum()
    return value.item(), grad.item()


ELL = 2.0
print("cond(K) =", torch.linalg.cond(kernel(torch.tensor(ELL))).item())""",
    ),
    (
        "code",
        """\
STEPS = [2, 4, 6, 8, 12, 16, 24, 32, 48, 64] + ([] if SMOKE else [96, 128, 192])
rows = []
for f in ("log", "inv"):
    exact_value, exact_grad = oracle(f, ELL)
    for dtype in (torch.float64, torch.float32):
        for reorth in (False, True):
            for m in STEPS:
                ell = torch.tensor(ELL, dtype=dtype, requires_grad=True)
                value, info = lgg.quad_form(
                    kernel(ell, dtype), v0.to(dtype), f, max_iter=m, tol=0.0, reorthogonalize=reorth, return_info=True
                )
                (grad,) = torch.autograd.grad(value, ell)
                rows.append(
                    dict(
                        f=f,
                        dtype=str(dtype).removeprefix("torch."),
                        reorth=reorth,
                        m=int(info.iterations),
                        residual=info.relative_residual.item(),
                        value_err=abs(value.item() - exact_value) / abs(exact_value),
                        grad_err=abs(grad.item() - exact_grad) / abs(exact_grad),
                    )
                )
print(f"{len(rows)} runs; exact d/d ell of v^T log(K) v = {oracle('log', ELL)[1]:.6g}")""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
styles = {
    ("float64", False): "C0o-",
    ("float64", True): "C1s--",
    ("float32", False): "C2^-",
    ("float32", True): "C3v--",
}
for ax, f in zip(axes, ("log", "inv"), strict=True):
    for (dtype, reorth), style in styles.items():
        sel = [r for r in rows if r["f"] == f and r["dtype"] == dtype and r["reorth"] == reorth]
        label = f"{dtype}, {'full reorth.' if reorth else 'no reorth.'}"
        ax.loglog([r["residual"] for r in sel], [max(r["grad_err"], 1e-17) for r in sel], style, label=label, ms=4)
    lo = min(r["residual"] for r in rows if r["f"] == f and r["residual"] > 0)
    xs = torch.logspace(torch.log10(torch.tensor(max(lo, 1e-16))), 0, 20)
    ax.loglog(xs, xs, "k:", lw=1, label="error = residual")
    ax.set(xlabel="relative Lanczos residual", title=f"f = {f}: gradient w.r.t. lengthscale")
    ax.invert_xaxis()
axes[0].set_ylabel("relative gradient error")
axes[0].legend(fontsize=8)
fig.tight_layout()""",
    ),
    (
        "code",
        """\
print(f"{'f':>4} {'dtype':>8} {'reorth':>6} {'m':>4} {'residual':>10} {'value err':>10} {'grad err':>10}")
for r in rows:
    if r["m"] in (STEPS[2], STEPS[6], STEPS[-1]):
        print(
            f"{r['f']:>4} {r['dtype']:>8} {r['reorth']!s:>6} {r['m']:4d} "
            f"{r['residual']:10.2e} {r['value_err']:10.2e} {r['grad_err']:10.2e}"
        )""",
    ),
    (
        "md",
        """\
Reading the plot: the gradient error falls with the residual along a line of slope about one,
with and without reorthogonalization — the forward-only gradient stays stable after the basis
loses orthogonality (ghost Ritz values only delay convergence). In float32 both level off at
the single-precision floor instead of diverging.""",
    ),
]


EIGEN = [
    (
        "md",
        """\
# Eigen-utilities: top-k eigenpairs and spectral density of a kernel matrix

`lgg.eigen` works on a symmetric operator given as a `LinearOperator`, a dense tensor or a
matvec, using only matrix-vector products:

- `lgg.eigen.lanczos` — top-`k` eigenpairs by thick-restart Lanczos (residuals against the
  original operator), with `lgg.eigen.deflated_power_iteration` as the classic baseline;
- `lgg.eigen.spectral_density` — the eigenvalue density by stochastic Lanczos quadrature;
- `lgg.eigen.trace`, `lgg.eigen.condition_number` — Hutchinson / Hutch++ and extreme eigenvalues.

Everything is compared with a dense eigendecomposition of an RBF kernel matrix on the concrete
inputs.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
import gpytorch

import lanczos_grad_gp.eigen  # makes lgg.eigen available whatever the package exports
from lanczos_grad_gp.app.datasets import load_default

N = 300 if SMOKE else 1030
K_TOP = 5 if SMOKE else 10
data = load_default(n=N, test_fraction=0.0)
kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
kernel.base_kernel.lengthscale = 1.5
with torch.no_grad():
    # evaluate_kernel(): GPyTorch's lazy kernel tensor has no matvec of its own
    K = kernel(data.train_x).evaluate_kernel().add_diagonal(torch.tensor(1e-2, dtype=torch.float64))
    dense = K.to_dense()
    exact = torch.linalg.eigvalsh(dense).flip(0)  # decreasing
print(f"n = {N}, largest eigenvalue {exact[0]:.4f}, smallest {exact[-1]:.4g}")""",
    ),
    (
        "code",
        """\
with torch.no_grad():
    start = time.perf_counter()
    top = lgg.eigen.lanczos(K, k=K_TOP, seed=0)
    t_lanczos = time.perf_counter() - start
    start = time.perf_counter()
    power = lgg.eigen.deflated_power_iteration(K, k=K_TOP, max_iter=100 if SMOKE else 300, seed=0)
    t_power = time.perf_counter() - start
print(f"Lanczos: {int(top.iterations)} matvecs, {t_lanczos:.3f} s")
print(f"power iteration: {int(power.iterations)} matvecs, {t_power:.3f} s")
print(f"{'i':>3} {'exact':>12} {'Lanczos':>12} {'residual':>10} {'power it.':>12} {'residual':>10}")
for i in range(K_TOP):
    print(
        f"{i:3d} {exact[i]:12.6f} {top.eigenvalues[i]:12.6f} {top.residuals[i]:10.2e} "
        f"{power.eigenvalues[i]:12.6f} {power.residuals[i]:10.2e}"
    )""",
    ),
    (
        "code",
        """\
with torch.no_grad():
    density = lgg.eigen.spectral_density(K, num_probes=10 if SMOKE else 30, num_iters=30 if SMOKE else 80, seed=0)
    tr = lgg.eigen.trace(K, num_matvecs=30, method="hutch++", seed=0)
    cond = lgg.eigen.condition_number(K, seed=0)
print(f"trace: Hutch++ {tr.estimate:.3f} ± {tr.standard_error:.3f}, exact {exact.sum():.3f}")
print(f"condition number: estimate {cond.estimate:.4g}, exact {exact[0] / exact[-1]:.4g}")""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
idx = range(1, K_TOP + 1)
axes[0].semilogy(idx, exact[:K_TOP], "ko-", label="dense eigvalsh")
axes[0].semilogy(idx, top.eigenvalues, "C1x", ms=10, label="lgg.eigen.lanczos")
axes[0].semilogy(idx, power.eigenvalues, "C2+", ms=10, label="deflated power iteration")
axes[0].set(xlabel="index", ylabel="eigenvalue", title=f"top-{K_TOP} eigenvalues")
axes[0].legend()
axes[1].hist(exact, bins=60, density=True, alpha=0.4, color="k", label="dense eigenvalues (histogram)")
axes[1].plot(density.grid, density.density, "C0", label=f"SLQ estimate (sigma = {density.sigma:.2g})")
axes[1].set(xlabel="eigenvalue", ylabel="density", yscale="log", title="spectral density")
axes[1].set_ylim(bottom=1e-4)
axes[1].legend()
fig.tight_layout()""",
    ),
    (
        "md",
        """\
A smooth kernel's spectrum decays fast: most eigenvalues sit just above the noise level, a few
large ones carry the variance. This is why a low-rank (pivoted-Cholesky) preconditioner plus a
few Lanczos steps suffices for the GP marginal likelihood.""",
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_large_exact_gp_protein.ipynb": PROTEIN,
    "03_botorch.ipynb": BOTORCH,
    "04_accuracy.ipynb": ACCURACY,
    "05_eigen.ipynb": EIGEN,
}


def main() -> None:
    """Write every notebook in :data:`NOTEBOOKS` next to this script."""
    for name, spec in NOTEBOOKS.items():
        nb = _notebook(spec, name)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
