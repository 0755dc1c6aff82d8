"""Shared pieces of the benchmarks: data, the fixed-hyperparameter model, and the method table."""

from __future__ import annotations

import contextlib
import math
import resource
from collections.abc import Callable
from pathlib import Path

import gpytorch
import torch
from torch import Tensor

import lanczos_grad_gp as lgg
from lanczos_grad_gp.app.datasets import load_uci
from lanczos_grad_gp.core.preconditioners import nystrom, pivoted_cholesky_preconditioner
from lanczos_grad_gp.kernels import ChunkedKernel, fuse_stationary_kernel

from . import baselines

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the data the benchmark tables cite, bundled with the repository (``benchmarks/data/README.md``)
BUNDLED_DATA_DIR = REPO_ROOT / "benchmarks" / "data"
_FALLBACK_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "uci"


def default_data_dir() -> Path:
    """``benchmarks/data`` when it holds the data; else a sibling ``shared/data/uci`` checkout, if any.

    Falls back to the bundled path (which then fails with a clear "not found") when neither exists.
    """
    if any(BUNDLED_DATA_DIR.glob("*/data.csv*")):
        return BUNDLED_DATA_DIR
    if _FALLBACK_DATA_DIR.is_dir():
        return _FALLBACK_DATA_DIR
    return BUNDLED_DATA_DIR


DEFAULT_DATA_DIR = default_data_dir()


def dataset_dir(data_dir: Path, dataset: str) -> Path:
    """``data_dir / dataset``, or a ``FileNotFoundError`` that says where the bundled sets are."""
    path = Path(data_dir) / dataset
    if not any(path.glob("data.csv*")):
        raise FileNotFoundError(
            f"data set {dataset!r} not found: no {path}/data.csv.gz. The sets the benchmarks cite are "
            f"bundled in {BUNDLED_DATA_DIR} (see its README.md); pass --data-dir to use another folder."
        )
    return path


#: sketch size of the ``ours-nystrom`` method
NYSTROM_RANK = 256

#: method name -> one-line description (the README table legend)
METHODS: dict[str, str] = {
    "cholesky": "(a) exact Cholesky, gpytorch.settings.max_cholesky_size(10**9)",
    "gpytorch": "(b) GPyTorch mBCG + SLQ, max_cholesky_size(0), default cg_tolerance (1.0), 10 probes",
    "gpytorch-tight": "(b) same, cg_tolerance(1e-4), max_cg_iterations(3000), max_lanczos_quadrature_iterations(100)",
    "ours": (
        "(e) lgg.settings.use_lanczos_grad(), defaults (tol 1e-4 f64, rank<=500 cost-aware precond: greedy "
        "pivoted Cholesky or adaptive Nyström, 10 probes), "
        "Lanczos at every n (max_cholesky_size(0))"
    ),
    "ours-tight": (
        "(e) ours with lanczos_tol(1e-6), max_lanczos_iter(400), max_preconditioner_size(1000), num_probes(30)"
    ),
    "ours-nystrom": (
        "(e) ours with the randomized Nyström preconditioner of rank 256 "
        "(lgg.settings.preconditioner_override(nystrom(256)))"
    ),
    "ours-greedy": (
        "(e) ours with the greedy pivoted-Cholesky preconditioner at every n (the default before the cost-aware "
        "choice: preconditioner_override(pivoted_cholesky_preconditioner))"
    ),
    "backprop": "(c) autograd through lgg.lanczos_tridiag, same probes/preconditioner/iterations as ours",
    "backprop-reorth": "(c) same with full reorthogonalization",
    "adjoint": "(d) adjoint Lanczos (Kraemer et al. 2024 / matfree), same probes/preconditioner/iterations",
    "ours-generic": (
        "(e) ours with lgg.settings.fused_kernels(False): GPyTorch builds the kernel with autograd and "
        "linear_operator back-propagates the n x n gradient through it (ours before the fused kernels)"
    ),
    "adjoint-fused": "(d) adjoint Lanczos on the same fused kernel operator as ours (closed-form kernel gradient)",
    "ours-chunked": "(e) ours on ChunkedKernel (row-chunked operator, never n x n)",
}
DENSE_METHODS = ("cholesky", "backprop", "backprop-reorth")


def load_data(
    dataset: str, n: int, *, dtype: torch.dtype, device: str, data_dir: Path, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """First ``n`` rows of a seeded permutation, z-scored; ``"synthetic"`` draws a smooth 8-d function.

    ``"synthetic32"``: 32 inputs, a smooth function of all of them with decaying relevance (the
    high-dimensional ARD case: ``d`` lengthscales in the kernel derivative).
    """
    if dataset == "synthetic32":
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 32, generator=g, dtype=torch.float64) * 4 - 2
        w = torch.linspace(1.0, 0.05, 32, dtype=torch.float64) / 32**0.5
        f = torch.sin(2 * x @ w) + 0.3 * torch.cos(x[:, :4].sum(-1))
        y = f + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
    elif dataset == "synthetic":
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 8, generator=g, dtype=torch.float64) * 4 - 2
        f = torch.sin(x @ torch.linspace(0.3, 1.2, 8, dtype=torch.float64)) + 0.5 * torch.cos(2 * x[:, 0] * x[:, 1])
        y = f + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
    else:
        data = load_uci(dataset_dir(data_dir, dataset), n=n, seed=seed, test_fraction=0.0)
        x, y = data.train_x, data.train_y
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


class FixedGP(gpytorch.models.ExactGP):
    """Zero mean, ``ScaleKernel(RBF-ARD)`` (optionally wrapped in :class:`ChunkedKernel`)."""

    def __init__(self, x: Tensor, y: Tensor, likelihood: gpytorch.likelihoods.GaussianLikelihood, chunked: bool):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1]))
        self.covar_module = ChunkedKernel(kernel) if chunked else kernel

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:  # type: ignore[override]
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_model(x: Tensor, y: Tensor, noise: float, *, chunked: bool = False) -> FixedGP:
    """Lengthscale 1 per dimension, outputscale 1, the given noise; in train mode."""
    lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-6))
    model = FixedGP(x, y, lik, chunked).to(device=x.device, dtype=x.dtype)
    scale = model.covar_module.base_kernel if chunked else model.covar_module
    scale.outputscale = 1.0
    scale.base_kernel.lengthscale = torch.ones(1, x.shape[-1])
    lik.noise = noise
    model.train()
    return model


def method_context(method: str) -> contextlib.ExitStack:
    """Settings under which ``method`` evaluates the MLL."""
    stack = contextlib.ExitStack()
    e = stack.enter_context
    if method == "cholesky":
        e(gpytorch.settings.max_cholesky_size(10**9))
    elif method.startswith("gpytorch"):
        e(gpytorch.settings.max_cholesky_size(0))
        e(gpytorch.settings.fast_computations(True, True, True))
        e(gpytorch.settings.num_trace_samples(10))
        if method == "gpytorch-tight":
            e(gpytorch.settings.cg_tolerance(1e-4))
            e(gpytorch.settings.max_cg_iterations(3000))
            e(gpytorch.settings.max_lanczos_quadrature_iterations(100))
    elif method.startswith("ours"):
        e(lgg.settings.use_lanczos_grad())
        # the flag leaves n <= max_cholesky_size to GPyTorch's Cholesky; the benchmark measures Lanczos at every n
        e(gpytorch.settings.max_cholesky_size(0))
        if method == "ours-generic":
            e(lgg.settings.fused_kernels(False))
        if method == "ours-nystrom":
            e(lgg.settings.preconditioner_override(nystrom(NYSTROM_RANK)))
        if method == "ours-greedy":
            e(lgg.settings.preconditioner_override(pivoted_cholesky_preconditioner))
        if method == "ours-tight":
            e(lgg.settings.lanczos_tol(1e-6))
            e(lgg.settings.max_lanczos_iter(400))
            e(lgg.settings.max_preconditioner_size(1000))
            e(lgg.settings.num_probes(30))
    return stack


def mll_and_grad(model: FixedGP, method: str, lanczos_steps: int | None = None) -> tuple[float, Tensor, dict]:
    """One forward + backward of the MLL (``/n``) under ``method``; gradient over all hyperparameters.

    Returns ``(mll, grad_vector, info)``; ``info`` carries ``iterations`` / ``preconditioner_rank``
    for ``ours*``. The Lanczos baselines need ``lanczos_steps`` (the steps ``ours`` took).
    """
    (x,), y = model.train_inputs, model.train_targets
    params = [p for _, p in model.named_parameters()]
    info: dict = {}
    with method_context(method):
        if method in ("backprop", "backprop-reorth", "adjoint", "adjoint-fused"):
            if lanczos_steps is None:
                raise ValueError(f"{method} needs lanczos_steps.")
            covar = model.likelihood(model(x)).lazy_covariance_matrix
            if method == "adjoint-fused":
                covar = fuse_stationary_kernel(covar)
            A = covar.evaluate_kernel()
            setup = baselines.make_setup(
                A,
                y,
                num_probes=lgg.settings.num_probes.value(),
                probe_seed=lgg.settings.probe_seed.value(),
                max_rank=lgg.settings.max_preconditioner_size.value(),
                precond_tol=lgg.settings.preconditioner_tol.value(),
            )
            if method.startswith("adjoint"):
                mll, _, _ = baselines.adjoint_lanczos_terms(A, setup, lanczos_steps)
            else:
                mll, _, _ = baselines.backprop_lanczos_terms(
                    A, setup, lanczos_steps, reorthogonalize=method == "backprop-reorth"
                )
            info["preconditioner_rank"] = setup.precond.rank
            info["iterations"] = lanczos_steps
        else:
            mll_fn = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
            with lgg.record_calls() as calls:
                mll = mll_fn(model(x), y)
            if calls:
                last = calls[-1]
                info["route"] = getattr(last, "route", "lanczos")
                if hasattr(last, "iterations"):  # a Lanczos call (routed calls carry no iterations)
                    info["iterations"] = int(last.iterations.max())
                    info["preconditioner_rank"] = int(last.preconditioner_rank)
                    info["preconditioner_kind"] = getattr(last, "preconditioner_kind", "pivoted_cholesky")
                info["converged"] = bool(last.converged)
        grads = torch.autograd.grad(mll, params)
    return float(mll.detach()), torch.cat([g.reshape(-1) for g in grads]).detach(), info


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS counter (Linux ``/proc/self/clear_refs`` = 5) and return the current RSS, MiB.

    After this, ``VmHWM`` (:func:`current_peak_rss_mb`) is the peak since the reset, so
    ``current_peak_rss_mb() - reset_peak_rss()`` is the extra memory of the code in between even
    when an earlier phase (imports) had a higher peak. Falls back to ``ru_maxrss`` elsewhere.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return peak_rss_mb()
    return _status_mb("VmRSS") or peak_rss_mb()


def current_peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), MiB."""
    return _status_mb("VmHWM") or peak_rss_mb()


def dense_bytes(n: int, dtype: torch.dtype) -> float:
    """Bytes of one dense ``n x n`` matrix."""
    return float(n) * n * torch.finfo(dtype).bits / 8


def rel(a: float | Tensor, b: float | Tensor) -> float:
    """``|a - b| / |b|`` (vector 2-norms for tensors)."""
    if isinstance(a, Tensor):
        return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))
    return abs(a - b) / abs(b) if b != 0 else math.nan


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """Wall time of ``fn()`` (synchronising CUDA), and its result."""
    import time

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out
