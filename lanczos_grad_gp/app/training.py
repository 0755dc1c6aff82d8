"""Train and evaluate a standard exact GP with one of three marginal-likelihood back ends.

Methods (the same model, data and optimiser; only the linear algebra differs):

- ``"ours"``: forward-only Lanczos gradients, :class:`lanczos_grad_gp.settings.use_lanczos_grad`.
- ``"cholesky"``: GPyTorch with exact Cholesky, ``gpytorch.settings.max_cholesky_size(10**9)``.
- ``"gpytorch"``: GPyTorch's default iterative path (mBCG + stochastic Lanczos quadrature),
  ``max_cholesky_size(0)`` with fast computations on.

Used by the command line (:mod:`lanczos_grad_gp.app.cli`), the notebooks and the benchmarks.

Example:
    >>> from lanczos_grad_gp.app.datasets import load_default
    >>> from lanczos_grad_gp.app.training import fit_and_evaluate
    >>> result = fit_and_evaluate(load_default(n=100), "cholesky", steps=2, progress=False)
    >>> result.method, len(result.losses)
    ('cholesky', 2)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import gpytorch
import torch
from torch import Tensor

from .. import settings as lgg_settings
from ..diagnostics import record_calls
from ..functions.inv_quad_logdet import InvQuadLogdetInfo
from .datasets import Dataset

__all__ = [
    "METHODS",
    "ExactGPModel",
    "Method",
    "Metrics",
    "RunResult",
    "evaluate",
    "fit_and_evaluate",
    "hyperparameters",
    "make_model",
    "method_context",
    "summarize_calls",
    "train",
]

Method = Literal["ours", "cholesky", "gpytorch"]
METHODS: tuple[str, ...] = ("ours", "cholesky", "gpytorch")


class ExactGPModel(gpytorch.models.ExactGP):
    """``ConstantMean`` + ``ScaleKernel(RBFKernel(ard_num_dims=d))``, the usual exact-GP regression model."""

    def __init__(self, train_x: Tensor, train_y: Tensor, likelihood: gpytorch.likelihoods.GaussianLikelihood) -> None:
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=train_x.shape[-1]))

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:  # type: ignore[override]
        """Prior at ``x``."""
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_model(train_x: Tensor, train_y: Tensor, *, seed: int | None = 0) -> ExactGPModel:
    """An :class:`ExactGPModel` with a ``GaussianLikelihood``, on ``train_x``'s device and dtype.

    The hyperparameters start at GPyTorch's defaults (deterministic); ``seed`` seeds torch's
    global generator first, so anything random in later steps is reproducible too.
    """
    if seed is not None:
        torch.manual_seed(seed)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(train_x, train_y, likelihood)
    return model.to(device=train_x.device, dtype=train_x.dtype)


def method_context(
    method: str, *, num_probes: int | None = None, max_iter: int | None = None, precond_rank: int | None = None
) -> contextlib.ExitStack:
    """The settings under which ``method`` computes the marginal likelihood (a context manager).

    Args:
        method: ``"ours"``, ``"cholesky"`` or ``"gpytorch"``.
        num_probes: probe vectors of the stochastic log-determinant (``ours`` and ``gpytorch``).
        max_iter: cap on Lanczos / CG iterations (``ours`` and ``gpytorch``).
        precond_rank: maximal pivoted-Cholesky preconditioner rank (``ours`` and ``gpytorch``).

    Raises:
        ValueError: unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    stack = contextlib.ExitStack()
    if method == "ours":
        stack.enter_context(lgg_settings.use_lanczos_grad())
        # the method itself at every size: the flag alone leaves n <= max_cholesky_size to Cholesky
        stack.enter_context(lgg_settings.max_cholesky_size(0))
        if num_probes is not None:
            stack.enter_context(lgg_settings.num_probes(num_probes))
        if max_iter is not None:
            stack.enter_context(lgg_settings.max_lanczos_iter(max_iter))
        if precond_rank is not None:
            stack.enter_context(lgg_settings.max_preconditioner_size(precond_rank))
    elif method == "cholesky":
        stack.enter_context(gpytorch.settings.max_cholesky_size(10**9))
    else:
        stack.enter_context(gpytorch.settings.max_cholesky_size(0))
        stack.enter_context(gpytorch.settings.fast_computations(True, True, True))
        if num_probes is not None:
            stack.enter_context(gpytorch.settings.num_trace_samples(num_probes))
        if max_iter is not None:
            stack.enter_context(gpytorch.settings.max_cg_iterations(max_iter))
            stack.enter_context(gpytorch.settings.max_lanczos_quadrature_iterations(max_iter))
        if precond_rank is not None:
            stack.enter_context(gpytorch.settings.max_preconditioner_size(precond_rank))
    return stack


@dataclass
class RunResult:
    """What one training run of one method produced.

    Attributes:
        method: the method name.
        losses: negative marginal log likelihood per datum, ``-MLL/n``, at every step.
        step_times: wall time of every step (forward, backward, optimiser update), seconds.
        metrics: test metrics after training (``None`` until evaluated).
        hyperparameters: fitted hyperparameters (z-scored scale).
        history: per-step extras recorded by a callback (e.g. test RMSE for training curves).
        diagnostics: for ``"ours"``, a summary of the Lanczos calls (:func:`summarize_calls`).
        accuracy: the method's loss and gradient errors against exact Cholesky at one common set of
            hyperparameters (:func:`objective_accuracy`), where computed.
        final_state: the trained model's ``state_dict`` (detached copies), set by :func:`fit_and_evaluate`.
    """

    method: str
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    metrics: Metrics | None = None
    hyperparameters: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)
    accuracy: ObjectiveAccuracy | None = None
    final_state: dict[str, Tensor] | None = None

    @property
    def time_per_step(self) -> float:
        """Mean wall time of a step in seconds, the first (warm-up) step excluded when there are more."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return sum(times) / len(times) if times else math.nan


@dataclass(frozen=True)
class Metrics:
    """Predictive test metrics on the original ``y`` scale.

    Attributes:
        rmse: root mean squared error of the predictive mean.
        nll: mean negative log predictive density of ``N(mean, var + noise)``.
    """

    rmse: float
    nll: float


def summarize_calls(calls: list[InvQuadLogdetInfo]) -> dict[str, float]:
    """``calls`` (Lanczos MLL evaluations), mean/max ``iterations`` per column, mean ``preconditioner_rank``.

    Entries of other routes (:class:`lanczos_grad_gp.routing.RouteInfo`) are left out.
    """
    calls = [info for info in calls if info.route == "lanczos"]
    if not calls:
        return {"calls": 0.0}
    iters = torch.cat([info.iterations.detach().flatten().to(torch.float64).cpu() for info in calls])
    return {
        "calls": float(len(calls)),
        "mean_iterations": float(iters.mean()),
        "max_iterations": float(iters.max()),
        "preconditioner_rank": sum(info.preconditioner_rank for info in calls) / len(calls),
    }


def _progress(iterable: range, enabled: bool, desc: str) -> Iterator[int]:
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, leave=True, dynamic_ncols=True))


@dataclass(frozen=True)
class ObjectiveAccuracy:
    """How far one method's training objective is from the exact one, at given hyperparameters.

    Attributes:
        loss_error: ``|loss − loss*|`` of ``-MLL/n``, against a float64 Cholesky evaluation.
        gradient_error: ``‖g − g*‖ / ‖g*‖`` over all hyperparameters (raw parameters, as Adam sees them).
        where: which hyperparameters (``"start"`` or ``"Cholesky's fit"``).
    """

    loss_error: float
    gradient_error: float
    where: str


def loss_and_gradient(
    model: ExactGPModel, method: str, *, seed: int = 0, **settings: int | None
) -> tuple[float, Tensor]:
    """``-MLL/n`` and its gradient (all raw parameters, concatenated) under ``method``'s settings.

    ``seed`` seeds the stochastic estimators (probe vectors of ``ours`` and ``gpytorch``).
    """
    model.train()
    model.zero_grad(set_to_none=True)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    (train_x,), train_y = model.train_inputs, model.train_targets
    torch.manual_seed(seed)
    with method_context(method, **settings):
        loss = -mll(model(train_x), train_y)
        loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grad.detach().to(torch.float64)


def objective_accuracy(
    data: Dataset,
    methods: Sequence[str],
    *,
    state: dict[str, Tensor] | None = None,
    seed: int = 0,
    **settings: int | None,
) -> dict[str, ObjectiveAccuracy]:
    """:class:`ObjectiveAccuracy` of every method in ``methods`` at one set of hyperparameters.

    ``state`` is a model ``state_dict`` (e.g. :attr:`RunResult.final_state` of a run); ``None``: the
    initial hyperparameters of :func:`make_model` (``seed``). Near a fitted state the exact gradient
    is close to zero, so a relative gradient error there measures little; the demo uses the start.
    The reference is exact Cholesky on a float64 copy of the model (one ``O(n³)`` evaluation).
    """

    def model_at(x: Tensor, y: Tensor) -> ExactGPModel:
        model = make_model(x, y, seed=seed)
        if state is not None:
            model.load_state_dict(state)
        return model

    reference = model_at(data.train_x.double(), data.train_y.double()).double()
    ref_loss, ref_grad = loss_and_gradient(reference, "cholesky", seed=seed)
    where = "start" if state is None else "Cholesky's fit"
    out = {}
    for method in methods:
        if method == "cholesky" and data.train_x.dtype == torch.float64:
            loss, grad = ref_loss, ref_grad  # the reference itself: no second O(n³) evaluation
        else:
            model = model_at(data.train_x, data.train_y)
            loss, grad = loss_and_gradient(model, method, seed=seed, **(settings if method != "cholesky" else {}))
        out[method] = ObjectiveAccuracy(
            loss_error=abs(loss - ref_loss),
            gradient_error=float((grad - ref_grad).norm() / ref_grad.norm()),
            where=where,
        )
    return out


def train(
    model: ExactGPModel,
    method: str,
    *,
    steps: int = 50,
    lr: float = 0.1,
    num_probes: int | None = None,
    max_iter: int | None = None,
    precond_rank: int | None = None,
    progress: bool = True,
    callback: Callable[[int, float, ExactGPModel], None] | None = None,
) -> RunResult:
    """Maximise the exact marginal likelihood with Adam under ``method``'s settings.

    Args:
        model: the model; its ``train_inputs``/``train_targets`` are the training data.
        method: ``"ours"``, ``"cholesky"`` or ``"gpytorch"`` (see :func:`method_context`).
        steps: Adam steps.
        lr: Adam learning rate.
        num_probes, max_iter, precond_rank: forwarded to :func:`method_context`.
        progress: show a tqdm progress bar with the current loss.
        callback: called as ``callback(step, loss, model)`` after each step, outside the timed
            region and inside ``method``'s settings (it may put the model in eval mode).

    Returns:
        A :class:`RunResult` with losses and step times (metrics not yet filled in).
    """
    if steps < 1:
        raise ValueError(f"steps must be positive; got {steps!r}.")
    result = RunResult(method=method)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    (train_x,), train_y = model.train_inputs, model.train_targets
    bar = _progress(range(steps), progress, desc=f"{method:>8}")
    settings = method_context(method, num_probes=num_probes, max_iter=max_iter, precond_rank=precond_rank)
    with settings, record_calls() as calls:
        for step in bar:
            model.train()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = -mll(model(train_x), train_y)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            result.step_times.append(time.perf_counter() - start)
            result.losses.append(value)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}")
            if callback is not None:
                callback(step, value, model)
    if method == "ours":
        result.diagnostics = summarize_calls(calls)
    return result


def evaluate(
    model: ExactGPModel, test_x: Tensor, test_y: Tensor, *, y_mean: float = 0.0, y_std: float = 1.0
) -> Metrics:
    """Test RMSE and mean predictive NLL on the original ``y`` scale (``y = y_z · y_std + y_mean``).

    Predictions use exact Cholesky solves for every method, so that differences between methods
    reflect the fitted hyperparameters only. ``model`` is left in eval mode.
    """
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**9), gpytorch.settings.fast_pred_var(False):
        pred = model.likelihood(model(test_x))
        mean = pred.mean * y_std + y_mean
        var = pred.variance * y_std**2
    y = test_y * y_std + y_mean
    rmse = torch.sqrt(torch.mean((mean - y) ** 2))
    nll = 0.5 * torch.mean(torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)
    return Metrics(rmse=float(rmse), nll=float(nll))


def hyperparameters(model: ExactGPModel) -> dict[str, float]:
    """``noise``, ``outputscale``, ``mean_lengthscale`` and ``constant_mean`` (z-scored data scale)."""
    return {
        "noise": float(model.likelihood.noise.detach().mean()),
        "outputscale": float(model.covar_module.outputscale.detach()),
        "mean_lengthscale": float(model.covar_module.base_kernel.lengthscale.detach().mean()),
        "constant_mean": float(model.mean_module.constant.detach()),
    }


def fit_and_evaluate(
    data: Dataset,
    method: str,
    *,
    steps: int = 50,
    lr: float = 0.1,
    seed: int = 0,
    num_probes: int | None = None,
    max_iter: int | None = None,
    precond_rank: int | None = None,
    progress: bool = True,
    callback: Callable[[int, float, ExactGPModel], None] | None = None,
) -> RunResult:
    """Build the model on ``data``, :func:`train` it under ``method``, :func:`evaluate` it.

    Every method starts from the same initial hyperparameters (``seed``). Returns the
    :class:`RunResult` with metrics and fitted hyperparameters filled in.
    """
    model = make_model(data.train_x, data.train_y, seed=seed)
    result = train(
        model,
        method,
        steps=steps,
        lr=lr,
        num_probes=num_probes,
        max_iter=max_iter,
        precond_rank=precond_rank,
        progress=progress,
        callback=callback,
    )
    result.metrics = evaluate(model, data.test_x, data.test_y, y_mean=data.y_mean, y_std=data.y_std)
    result.hyperparameters = hyperparameters(model)
    result.final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return result
