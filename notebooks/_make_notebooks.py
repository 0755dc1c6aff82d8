"""Generate the example notebooks (``notebooks/*.ipynb``) reproducibly, without outputs.

Run from anywhere::

    python notebooks/_make_notebooks.py

At their default sizes the notebooks run in a few minutes in all on 2 CPU cores, far inside nbmake's
300 s cell timeout. ``python -m pytest --nbmake notebooks/`` (the README's command) runs them, and so
does ``tests/test_notebooks.py`` in the default test run. ``LGG_SMOKE=1`` in the environment shrinks sizes and
step counts further (a quick check, not needed to pass). Notebook 02 reads the protein data bundled in
``benchmarks/data/``. Edit the cell sources here, never the ``.ipynb`` files by hand, and regenerate.
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

SMOKE = os.environ.get("LGG_SMOKE", "0") == "1"  # optional: extra-small sizes for a quick check
torch.manual_seed(0)
print("LGG_SMOKE=1: extra-small sizes" if SMOKE else "default sizes")"""


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

Here we take an ordinary GPyTorch model on the *concrete* data that ships with the package (927
training points) and compare the MLL and its gradient with exact Cholesky. At `n ≤ 800` (GPyTorch's
`max_cholesky_size`, or `lgg.settings.max_cholesky_size`) the flag would leave the computation to exact
Cholesky, which is cheaper there. 927 points are just above that threshold, so the flag runs Lanczos here.
Below a couple of thousand points Cholesky is still the faster choice on a CPU.
`02_large_exact_gp_protein.ipynb` shows where Lanczos overtakes it.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
import gpytorch

from lanczos_grad_gp.app.datasets import load_default

data = load_default()  # all 1030 rows, 10% held out
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
for probes in (10, 100) if SMOKE else (10, 100, n):
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
    for _ in range(5 if SMOKE else 30):
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
# A larger exact GP on protein: where forward-only Lanczos wins, and where Cholesky does

Exact GP regression (`ScaleKernel(RBF-ARD)`) on the UCI *protein* data (45 730 rows, 9 inputs). The data
is bundled with the repository in `benchmarks/data/protein` (source, licence and SHA-256 in
`benchmarks/data/README.md`). This notebook reads it from there and stops with an error if it is missing.
It never swaps in another data set. Three back ends compute the same marginal likelihood (MLL):

- **ours**: forward-only Lanczos gradients (`lgg.settings.use_lanczos_grad()`),
- **gpytorch**: GPyTorch's default iterative path (mBCG + stochastic Lanczos quadrature, CG tolerance 1),
- **cholesky**: exact Cholesky, the reference.

Part 1 times one MLL + gradient at several `n` and measures each result's error against Cholesky.
Part 2 trains for a few Adam steps at one `n`. On a CPU only the *ratios* of times within one run mean
anything. `python -m benchmarks.run` gives the full tables, up to n = 10 000.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
from pathlib import Path

import gpytorch

from lanczos_grad_gp.app.datasets import load_uci
from lanczos_grad_gp.app.training import evaluate, fit_and_evaluate, make_model, method_context


def bundled_data(name):
    \"\"\"``benchmarks/data/<name>`` of this repository (the notebook may run from ``notebooks/`` or the root).\"\"\"
    for root in (Path.cwd(), *Path.cwd().parents):
        if (root / "benchmarks" / "data" / name / "data.csv.gz").is_file():
            return root / "benchmarks" / "data" / name
    raise FileNotFoundError(
        f"benchmarks/data/{name}/data.csv.gz not found in {Path.cwd()} or above it. Run this notebook "
        "from a clone of the repository, which bundles the data (see benchmarks/data/README.md)."
    )


PROTEIN = bundled_data("protein")
SIZES = (300, 800) if SMOKE else (500, 2000, 4000)  # part 1: rows per MLL + gradient
N_TRAIN = 900 if SMOKE else 2500  # part 2: rows (train + 10% test)
STEPS = 3 if SMOKE else 10
EVAL_EVERY = 1 if SMOKE else 3
METHODS = ("ours", "gpytorch", "cholesky")
print(f"protein from {PROTEIN}")""",
    ),
    (
        "md",
        """\
## Part 1: one MLL + gradient at several n

The same model at every size: the benchmark protocol of `benchmarks/README.md`, which is lengthscale 1
per z-scored input, outputscale 1 and noise 0.1. Each time is the faster of two forward + backward
passes. Errors are relative to Cholesky, for the MLL and for the gradient over all
hyperparameters. `method_context("ours")` runs Lanczos at every `n`. The bare flag would leave
`n ≤ 800` (GPyTorch's `max_cholesky_size`) to Cholesky (see the end of this notebook).""",
    ),
    (
        "code",
        """\
def mll_and_grad(model, method):
    (x,), y = model.train_inputs, model.train_targets
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    with method_context(method):
        start = time.perf_counter()
        value = mll(model(x), y)
        grads = torch.autograd.grad(value, params)
        elapsed = time.perf_counter() - start
    return value.item(), torch.cat([g.reshape(-1) for g in grads]), elapsed


rows = []
for n in SIZES:
    data = load_uci(PROTEIN, n=n, seed=0, test_fraction=0.0)
    model = make_model(data.train_x, data.train_y)
    model.covar_module.base_kernel.lengthscale = 1.0
    model.covar_module.outputscale = 1.0
    model.likelihood.noise = 0.1
    model.train()
    results = {}
    for method in METHODS:
        runs = [mll_and_grad(model, method) for _ in range(2)]  # the first run includes warm-up costs
        value, grad, _ = runs[-1]
        results[method] = (value, grad, sorted(t for _, _, t in runs)[0])
    ref_value, ref_grad, _ = results["cholesky"]
    for method, (value, grad, seconds) in results.items():
        rows.append(
            dict(
                n=n,
                method=method,
                seconds=seconds,
                mll_err=abs(value - ref_value) / abs(ref_value),
                grad_err=((grad - ref_grad).norm() / ref_grad.norm()).item(),
            )
        )

print(f"{'n':>5} {'method':>9} {'time (s)':>9} {'x cholesky':>10} {'MLL rel. err':>13} {'grad rel. err':>14}")
for r in rows:
    chol = next(q["seconds"] for q in rows if q["n"] == r["n"] and q["method"] == "cholesky")
    print(
        f"{r['n']:5d} {r['method']:>9} {r['seconds']:9.3f} {r['seconds'] / chol:10.2f} "
        f"{r['mll_err']:13.1e} {r['grad_err']:14.1e}"
    )""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for i, method in enumerate(METHODS):
    sel = [r for r in rows if r["method"] == method]
    axes[0].loglog([r["n"] for r in sel], [r["seconds"] for r in sel], "o-", color=f"C{i}", label=method)
    if method != "cholesky":
        axes[1].semilogy([r["n"] for r in sel], [r["grad_err"] for r in sel], "o-", color=f"C{i}", label=method)
axes[0].set(xlabel="n", ylabel="seconds per MLL + gradient", title="time (lower is better)")
axes[1].set(xlabel="n", ylabel="gradient rel. error vs Cholesky", title="gradient error (lower is better)")
for ax in axes:
    ax.legend()
fig.tight_layout()""",
    ),
    (
        "md",
        """\
**Reading the table** (2 CPU cores, float64; the printout above is this run's own measurement):

- **Small n (a few hundred rows): use Cholesky.** It is exact and the fastest of the three. Ours pays fixed
  costs there: the pivoted-Cholesky preconditioner and 10 probes run to tolerance 1e-4, and they buy
  nothing at that size. This is why the flag leaves `n ≤ max_cholesky_size` (800 by default) to
  GPyTorch's Cholesky.
- **Around two thousand rows ours catches up with Cholesky, and at 4000 it takes a fraction of Cholesky's
  time.** Its cost grows like `n²` (matrix-vector products) and Cholesky's like `n³`, so the gap widens
  with `n`: at n = 10 000 ours is 12× faster than Cholesky in `benchmarks/README.md`. Its MLL and
  gradient stay within a few 1e-3 of Cholesky's.
- **GPyTorch's default iterative path is the fastest of the three above a few hundred rows, and the least
  accurate.** It stops CG at tolerance 1 (its training-mode default). Its gradient is off by several
  percent at n = 500, and by tens of percent at the larger sizes (the right-hand plot). Tightened to
  tolerance 1e-4, about the accuracy of ours, it takes 4.5–5× our time at n = 10 000
  (`benchmarks/README.md`, `gpytorch-tight`).

So the choice depends on n. Below a couple of thousand rows use Cholesky. Above that, ours gives
Cholesky-accurate gradients in a fraction of Cholesky's time. GPyTorch's default is cheaper per call
but follows a gradient that can be far off.""",
    ),
    (
        "md",
        """\
## Part 2: a few Adam steps

The same three back ends train `ExactGPModel` (constant mean, `ScaleKernel(RBF-ARD)`, GPyTorch's initial
hyperparameters) on the first `N_TRAIN` rows of the same permutation. 10% of those rows are held out.
Every few steps the test RMSE is computed with Cholesky predictions for all three, so the curves
compare the hyperparameters each method finds. `python -m benchmarks.train` runs the same comparison on
four data sets.""",
    ),
    (
        "code",
        """\
data = load_uci(PROTEIN, n=N_TRAIN, seed=0)
print(f"{data.name}: {data.num_train} train / {data.num_test} test points, d = {data.dim}")
runs = {}


def train_one(method):
    \"\"\"Adam under ``method`` from the common start, test RMSE every ``EVAL_EVERY`` steps.\"\"\"
    curve = {"step": [], "rmse": []}

    def record(step, loss, model):
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
    ("code", 'train_one("ours")'),
    ("code", 'train_one("gpytorch")'),
    ("code", 'train_one("cholesky")'),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for method, result in runs.items():
    axes[0].plot(result.losses, label=method)
    axes[1].plot(result.history["step"], result.history["rmse"], marker="o", label=method)
axes[0].set(xlabel="Adam step", ylabel="-MLL / n (each method's own estimate)", title="training loss")
axes[1].set(xlabel="Adam step", ylabel="test RMSE", title="test RMSE (Cholesky predictions)")
names = list(runs)
axes[2].bar(names, [1e3 * runs[m].time_per_step for m in names], color=["C0", "C1", "C2"])
axes[2].set(ylabel="ms per step", title=f"time per training step, n = {data.num_train}")
for ax in axes[:2]:
    ax.legend()
fig.tight_layout()""",
    ),
    (
        "md",
        """\
At this size **ours** takes less time per step than Cholesky, and its loss curve follows Cholesky's up to
the Monte Carlo noise of the log-determinant estimate. GPyTorch's default path is cheaper still per step
(tolerance 1, see Part 1). Over many steps its inaccurate gradient can end at different hyperparameters:
with 50 steps at n = 4500, `benchmarks/README.md` ("Training benchmark") measures a worse test RMSE or NLL
on three of four data sets. Ten steps from the same start are too few to show that. The bars are this
run's own measurement.

**The bare flag at small n.** The timings above use `method_context("ours")`, which runs Lanczos at every
`n`. The flag on its own, `lgg.settings.use_lanczos_grad()`, routes `n ≤ max_cholesky_size` to
GPyTorch's exact Cholesky. The threshold is `lgg.settings.max_cholesky_size`, which follows
`gpytorch.settings.max_cholesky_size` unless set: 800 by default, 4096 once BoTorch is imported. That
is the better choice there, as Part 1 shows. To force Lanczos at every size, use
`lgg.settings.max_cholesky_size(0)`, or `gpytorch.settings.max_cholesky_size(0)`, which it follows by
default.""",
    ),
]


BOTORCH = [
    (
        "md",
        """\
# Bayesian optimisation with BoTorch under the flag

BoTorch fits its models with `fit_gpytorch_mll` (L-BFGS on the exact MLL). Inside
`lgg.settings.use_lanczos_grad()` that fit uses forward-only Lanczos gradients; the probe
vectors are seeded, so L-BFGS sees a deterministic objective.

The flag routes each fit by its size. Up to `max_cholesky_size` training points it leaves the
likelihood to GPyTorch's exact Cholesky. The threshold is `lgg.settings.max_cholesky_size`, which by
default follows `gpytorch.settings.max_cholesky_size`: 800 in GPyTorch, 4096 once BoTorch is imported
(BoTorch raises it). At those sizes Cholesky is cheap, exact and deterministic, which is what L-BFGS
needs. Above the threshold the flag uses Lanczos. A BO loop with a few dozen points therefore runs
exactly as BoTorch's default does, and this notebook shows just that. Here: a small BO loop on the Branin function with
`LogExpectedImprovement` and `optimize_acqf`, once inside the flag and once without it.
`lgg.record_calls()` counts which route every fit took, and the first printout shows the threshold.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
import contextlib

import gpytorch
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
N_ITER = 3 if SMOKE else 15
ACQF = dict(num_restarts=2 if SMOKE else 4, raw_samples=32 if SMOKE else 256)


def bo_loop(use_ours: bool, seed: int = 0):
    torch.manual_seed(seed)  # optimize_acqf's random restarts: the same in both loops
    x = draw_sobol_samples(bounds=problem.bounds, n=N_INIT, q=1, seed=seed).squeeze(-2)
    y = problem(x).unsqueeze(-1)
    best = [y.max().item()]
    fit_time, routes = 0.0, {}
    for _ in range(N_ITER):
        model = SingleTaskGP(x, y, input_transform=Normalize(d=2), outcome_transform=Standardize(m=1))
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        flag = lgg.settings.use_lanczos_grad() if use_ours else contextlib.nullcontext()
        start = time.perf_counter()
        with flag, lgg.record_calls() as calls:  # one entry per MLL evaluation the flag routed
            fit_gpytorch_mll(mll)
        fit_time += time.perf_counter() - start
        for info in calls:
            routes[info.route] = routes.get(info.route, 0) + 1
        acqf = LogExpectedImprovement(model, best_f=y.max())
        candidate, _ = optimize_acqf(acqf, bounds=problem.bounds, q=1, **ACQF)
        x = torch.cat([x, candidate])
        y = torch.cat([y, problem(candidate).unsqueeze(-1)])
        best.append(y.max().item())
    return best, fit_time, routes, model, x""",
    ),
    (
        "code",
        """\
best_flag, time_flag, routes_flag, model_flag, x_flag = bo_loop(use_ours=True)
best_default, time_default, routes_default, model_default, x_default = bo_loop(use_ours=False)
threshold = gpytorch.settings.max_cholesky_size.value()  # what lgg.settings.max_cholesky_size follows by default
print(f"training points at the last fit: {N_INIT + N_ITER - 1}; gpytorch.settings.max_cholesky_size = {threshold}")
print(f"both loops evaluated the same points: {torch.allclose(x_flag, x_default)}")
print(f"best found: flag {best_flag[-1]:.4f}, default {best_default[-1]:.4f}, optimum {problem.optimal_value:.4f}")
print(f"total fit time: flag {time_flag:.2f} s, default {time_default:.2f} s")
print(f"MLL evaluations by route under the flag: {routes_flag}; without it: {routes_default or 'none recorded'}")
ls = model_flag.covar_module.lengthscale.detach().squeeze()
print("last model (flag): lengthscales", [round(v, 3) for v in ls.tolist()])""",
    ),
    (
        "code",
        """\
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(best_flag, marker="o", label="fit under use_lanczos_grad")
ax.plot(best_default, marker="s", ls="--", label="BoTorch default fit")
ax.axhline(problem.optimal_value, color="k", lw=0.8, label="optimum")
ax.set(xlabel="BO iteration", ylabel="best observed (negated Branin)", title="Branin, LogEI")
ax.legend()
fig.tight_layout()""",
    ),
    (
        "md",
        """\
With a few dozen points every fit under the flag takes the `cholesky` route (the printout counts them).
The two loops are then the same computation and evaluate the same points (the printout checks it).
That is the intended behaviour:
below a few thousand points Cholesky is exact and faster than any iterative method
(`02_large_exact_gp_protein.ipynb`, Part 1). The flag is safe to leave on around BoTorch code. It
switches to forward-only Lanczos only for models above `max_cholesky_size`, such as high-throughput BO
or multi-fidelity data with thousands of observations, where it pays off.""",
    ),
]


ACCURACY = [
    (
        "md",
        r"""# Gradient accuracy versus the Lanczos residual

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
import warnings

from linear_operator.utils.warnings import NumericalWarning

STEPS = [2, 4, 6, 8, 12, 16, 24, 32, 48, 64] + ([] if SMOKE else [96, 128, 192])
# tol=0 with a fixed max_iter: every run stops at m steps "unconverged" on purpose, so the
# NumericalWarning that says so (the library never returns an unconverged value silently) is expected here
warnings.filterwarnings("ignore", message=r".*did not meet tol=0\\.0e\\+00", category=NumericalWarning)
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
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
idx = range(1, K_TOP + 1)
axes[0].semilogy(idx, exact[:K_TOP], "ko-", label="dense eigvalsh")
axes[0].semilogy(idx, top.eigenvalues, "C1x", ms=10, label="lgg.eigen.lanczos")
axes[0].semilogy(idx, power.eigenvalues, "C2+", ms=10, label="deflated power iteration")
axes[0].set(xlabel="index", ylabel="eigenvalue", title=f"top-{K_TOP} eigenvalues")
axes[0].legend()
# middle: the density itself, on a linear axis (it integrates to 1)
heights, _, _ = axes[1].hist(exact, bins=60, density=True, alpha=0.4, color="k", label="dense eigenvalues")
axes[1].plot(density.grid, density.density, "C0", label=f"SLQ estimate (sigma = {density.sigma:.2g})")
top = 1.15 * max(float(heights.max()), float(density.density.max()))
axes[1].set(xlabel="eigenvalue", ylabel="density (fraction per unit eigenvalue)", title="spectral density")
axes[1].set_ylim(0, top)
axes[1].legend()
# right: the tail, as a count: how many eigenvalues lie above each value (log scale)
grid = density.grid
cdf = torch.cumulative_trapezoid(density.density, grid).clamp(0, 1)
above_slq = N * (1 - torch.cat([cdf.new_zeros(1), cdf]))
above_exact = (exact.unsqueeze(0) > grid.unsqueeze(1)).sum(1)
axes[2].semilogy(grid, above_exact, "k", drawstyle="steps-post", label="dense eigenvalues")
axes[2].semilogy(grid, above_slq.clamp_min(0.5), "C0", label="SLQ estimate")
axes[2].set(xlabel="eigenvalue λ", ylabel="number of eigenvalues > λ", title="tail of the spectrum")
axes[2].set_ylim(0.5, 2 * N)
axes[2].legend()
fig.tight_layout()""",
    ),
    (
        "md",
        """\
A smooth kernel's spectrum decays fast: most eigenvalues sit just above the noise level (the tall bar at
the left of the middle panel), a few large ones carry the variance (the right panel counts them). The SLQ
estimate is a Gaussian-smoothed density, so it resolves the bulk and the overall decay, not individual
isolated eigenvalues; `lgg.eigen.lanczos` finds those. This is why a low-rank (pivoted-Cholesky) preconditioner plus a
few Lanczos steps suffices for the GP marginal likelihood.""",
    ),
    (
        "md",
        """## The Hessian of a neural network's loss

`lgg.eigen.HessianOperator(model, loss_fn, inputs, targets)` is the Hessian `∇²_θ L` of a PyTorch
model's loss as an operator: each product is a Hessian-vector product (double backward, batched over
the Lanczos block), the `n × n` matrix is never formed. `GGNOperator` is the generalised Gauss–Newton
matrix `Jᵀ H_ℓ J` (positive semi-definite). Every eigen function takes them. Here: a small MLP on
the concrete data, top eigenvalues against `torch.autograd.functional.hessian` + `eigvalsh`.""",
    ),
    (
        "code",
        """torch.manual_seed(0)
HIDDEN = 8 if SMOKE else 16
mlp = torch.nn.Sequential(
    torch.nn.Linear(data.train_x.shape[-1], HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)
).double()
xb, yb = data.train_x[:256], data.train_y[:256].unsqueeze(-1)
loss_fn = torch.nn.MSELoss()
H = lgg.eigen.HessianOperator(mlp, loss_fn, xb, yb)
params = list(mlp.parameters())
shapes = [p.shape for p in params]
sizes = [p.numel() for p in params]


def loss_of_flat(flat):
    # the same loss as a function of one flat parameter vector, for the dense reference
    chunks = torch.split(flat, sizes)
    out = torch.func.functional_call(
        mlp, {name: c.view(sh) for (name, _), c, sh in zip(mlp.named_parameters(), chunks, shapes, strict=True)}, (xb,)
    )
    return loss_fn(out, yb)


flat = torch.cat([p.detach().reshape(-1) for p in params])
H_dense = torch.autograd.functional.hessian(loss_of_flat, flat)
exact_h = torch.linalg.eigvalsh(H_dense)
exact_h = exact_h[exact_h.abs().argsort(descending=True)]  # "LM" order
hess_top = lgg.eigen.lanczos(H, k=5, which="LM", tol=1e-8, seed=0)
ggn_top = lgg.eigen.lanczos(lgg.eigen.GGNOperator(mlp, loss_fn, xb, yb), k=5, which="LA", tol=1e-8, seed=0)
print(f"{sum(sizes)} parameters; Hessian: {int(hess_top.iterations)} Hessian-vector products")
print(f"{'i':>3} {'dense Hessian':>14} {'Lanczos':>14} {'converged':>10} {'GGN (LA)':>12}")
for i in range(5):
    print(
        f"{i:3d} {exact_h[i]:14.8f} {hess_top.eigenvalues[i]:14.8f} {bool(hess_top.converged[i])!s:>10} "
        f"{ggn_top.eigenvalues[i]:12.8f}"
    )
print("max relative error:", float(((hess_top.eigenvalues - exact_h[:5]) / exact_h[:5]).abs().max()))""",
    ),
    (
        "md",
        """## Repeated eigenvalues: found, or not claimed

Single-vector Lanczos sees one copy of a repeated eigenvalue (in exact arithmetic the Krylov space
holds one vector of each eigenspace). Returning a lower eigenvalue in its place *marked converged*
is a silent wrong answer. `lgg.eigen.lanczos` runs a deflated check after convergence: a short
restart orthogonal to the pairs found. With `block_size=1` a missed copy shows up there, and the
pairs it puts in doubt come back `converged=False` with a `NumericalWarning`; `block_size=b` finds
multiplicities up to `b` directly. The operator: eigenvalue 10 four times, then 5, 4, 3, ….""",
    ),
    (
        "code",
        """import warnings

lam = torch.cat([torch.full((4,), 10.0), torch.linspace(5.0, 0.1, 96)]).double()
Q, _ = torch.linalg.qr(torch.randn(100, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
A = Q @ torch.diag(lam) @ Q.T
A = 0.5 * (A + A.T)
for b in (1, 4):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lgg.eigen.lanczos(A, k=4, block_size=b, tol=1e-10, seed=0)
    print(
        f"block_size={b}: eigenvalues {[round(float(v), 6) for v in res.eigenvalues]}, "
        f"converged {res.converged.tolist()}, {len(caught)} warning(s), {int(res.iterations)} products"
    )""",
    ),
    (
        "md",
        """Either all four copies of 10 come back converged, or a pair that is not supported is reported
`converged=False` (with a warning); never a 5 in place of a 10 marked converged.
`benchmarks/eigen_vs_peers.py` runs the same case against scipy's `eigsh` and hessian-eigenthings,
and measures products, time and errors on a larger MLP Hessian, a small CNN's Hessian and kernel
matrices at `n = 5000` and `n = 20000`.""",
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
