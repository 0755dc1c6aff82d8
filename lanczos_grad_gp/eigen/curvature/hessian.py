r"""``HessianOperator``: the Hessian ``H = ∇²_θ L(θ)`` of a model's loss as a batched operator.

``H V`` for a block ``V = [v_1, …, v_c]`` of the Lanczos iteration, per batch (averaged as in
:mod:`.averaged`), by one of

* ``method="autograd"`` (default): double backward (Pearlmutter 1994). One forward and one backward
  pass with ``create_graph=True`` give ``g(θ) = ∇_θ L`` with its graph; then
  ``H v = ∇_θ (g^T v)`` for all ``c`` columns in ONE vectorised call
  ``torch.autograd.grad(g, θ, grad_outputs=V, is_grads_batched=True)`` (a loop over the columns
  where an op of the model has no batching rule). Works with any module autograd works with.
  For one fixed batch (the constructor, not :meth:`HessianOperator.from_loader`), inside
  :meth:`~.base.CurvatureOperator.cached_graph` — which every eigen function enters for the length
  of its call — the gradient and its graph are built once and reused by every product: a product is
  then one double-backward pass instead of forward + backward + double backward. Each block starts
  from a fresh graph and frees it (the activations of one forward pass) when it ends, so every eigen
  call sees the model as it is when the call starts. Inside a block the graph is rebuilt when a
  parameter or buffer of the model (or of ``loss_fn``), or a data tensor, is replaced or modified in
  place (identity, storage, autograd version counter), or a submodule switches train/eval mode;
  writes through ``.data`` or NumPy views are invisible to it, so do not change the model that way
  inside your own ``with H.cached_graph():`` block. Outside a block every product builds its own
  graph; ``cache_graph=False`` makes that the rule.
* ``method="func"``: torch.func, ``H v = vjp(grad(L), θ)(v)`` (reverse-over-reverse; ``H`` is
  symmetric), the pullback built once per batch and ``vmap``-ed over the columns (needs a model
  ``torch.func.functional_call`` can run).

Example:
    >>> import torch
    >>> from lanczos_grad_gp.eigen import lanczos
    >>> from lanczos_grad_gp.eigen.curvature import HessianOperator
    >>> g = torch.Generator().manual_seed(0)
    >>> model = torch.nn.Linear(3, 1).double()
    >>> x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    >>> y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    >>> H = HessianOperator(model, torch.nn.MSELoss(), x, y)  # least squares: H = 2/N [x 1]^T [x 1]
    >>> X1 = torch.cat([x, torch.ones(20, 1, dtype=torch.float64)], 1)
    >>> bool(torch.allclose(H.to_dense(), 2 * X1.T @ X1 / 20))
    True
    >>> top = lanczos(H, k=2, seed=0)
    >>> bool(torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(2 * X1.T @ X1 / 20).flip(0)[:2]))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .averaged import AveragedCurvature, LossFn
from .params import call_model

__all__ = ["HessianOperator"]

HvpMethod = Literal["autograd", "func"]


class HessianOperator(AveragedCurvature):
    """Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. the parameters (module docstring).

    Args:
        model: the ``torch.nn.Module`` (put it in ``eval()`` mode: dropout makes ``H`` random).
        loss_fn: ``(outputs, targets) -> scalar``, e.g. ``torch.nn.MSELoss()``.
        inputs: a tensor (``model(inputs)``) or a tuple/list of tensors (``model(*inputs)``).
        targets: whatever ``loss_fn`` takes as its second argument.
        params: the parameters (a subset is a diagonal block of the Hessian); default: all that
            require grad. ``n`` is their total number of entries, in this order.
        method: ``"autograd"`` or ``"func"``.
        cache_graph: inside :meth:`cached_graph` (every eigen call), build the gradient graph once
            and reuse it for every product (``method="autograd"``; module docstring). ``False``: one
            graph per product (less memory held during the call).

    Use :meth:`from_loader` for a data loader (the average over its batches).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Any,
        targets: Any,
        *,
        params: Iterable[Tensor] | None = None,
        method: HvpMethod = "autograd",
        cache_graph: bool = True,
    ) -> None:
        if not isinstance(cache_graph, bool):
            raise ValueError(f"cache_graph must be a bool; got {cache_graph!r}.")
        self._init(model, loss_fn, [(inputs, targets)], params=params, method=method, num_batches=None)
        self._cacheable = cache_graph and method == "autograd"
        self._data = [*_tensors(inputs), *_tensors(targets)]  # the caller's tensors (their versions key the cache)

    def _init(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        *,
        params: Iterable[Tensor] | None,
        method: str,
        num_batches: int | None,
    ) -> None:
        if method not in ("autograd", "func"):
            raise ValueError(f"method must be 'autograd' or 'func'; got {method!r}.")
        self.method = method
        self._cacheable = False  # one fixed batch and double backward only (set by __init__)
        self._caching = 0  # depth of open cached_graph() blocks
        self._data: list[Tensor] = []
        self._cached: tuple[tuple[object, ...], list[int], list[Tensor], list[Tensor]] | None = None
        super().__init__(model, loss_fn, batches, params=params, num_batches=num_batches, needs_names=method == "func")

    @classmethod
    def from_loader(
        cls,
        model: nn.Module,
        loss_fn: LossFn,
        loader: Iterable[Any],
        *,
        params: Iterable[Tensor] | None = None,
        method: HvpMethod = "autograd",
        num_batches: int | None = None,
    ) -> HessianOperator:
        """The Hessian of the data-set loss ``Σ_b (|b|/N) loss_b`` over a re-iterable loader of ``(inputs, targets)``.

        Every product reads the loader once (``num_batches``: only the first batches). A shuffling
        loader gives a different operator at each product; use a fixed order.
        """
        op = cls.__new__(cls)
        op._init(model, loss_fn, loader, params=params, method=method, num_batches=num_batches)
        return op

    def _batch_product(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> Sequence[Tensor | None]:
        if self.method == "func":
            return self._hvp_func(inputs, targets, vs)
        return self._hvp_autograd(inputs, targets, vs)

    @contextlib.contextmanager
    def cached_graph(self) -> Iterator[None]:
        """Reuse one gradient graph for the products inside the block (module docstring).

        Every block starts from a fresh graph (so each eigen call builds its own) and frees it at the
        end. Not thread-safe: share an operator between threads only outside such blocks.
        """
        self._caching += 1
        self._cached = None
        try:
            yield
        finally:
            self._caching -= 1
            if not self._caching:
                self._cached = None

    def _graph_state(self) -> tuple[tuple[object, ...], list[Tensor]]:
        """The state a gradient graph depends on, as a comparable key, and the tensors it names.

        Every parameter and buffer of the model (and of ``loss_fn`` when it is a module), the selected
        parameters and the caller's data: identity, storage and in-place version; and the train/eval
        mode of every submodule. The cache holds the tensors, so their ids stay unique. Invisible:
        writes through ``.data`` or NumPy views, and state outside tensors.
        """
        modules = list(self.model.modules())
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.params, *self._data]
        if isinstance(self.loss_fn, nn.Module):
            modules += list(self.loss_fn.modules())
            tensors += [*self.loss_fn.parameters(), *self.loss_fn.buffers()]
        key = (tuple(m.training for m in modules), tuple((id(t), t.data_ptr(), t._version) for t in tensors))
        return key, tensors

    def _gradient_graph(self, inputs: Any, targets: Any) -> tuple[list[int], list[Tensor]]:
        """``(live, g)``: the parameters the loss depends on and ``g = ∇ L`` for them, with its graph."""
        caching = self._cacheable and self._caching > 0
        if caching and self._cached is not None and self._cached[0] == self._graph_state()[0]:
            return self._cached[1], self._cached[2]
        self._cached = None  # free an outdated graph before building the next one
        loss = self.loss_fn(call_model(self.model, inputs), targets)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: zero rows of H
        gs = [grads[i] for i in live]
        if caching:
            # the state AFTER the forward pass: running statistics it updated (BatchNorm in train mode)
            # belong to this graph, and the next product finds them unchanged
            key, refs = self._graph_state()
            self._cached = (key, live, gs, refs)
        return live, gs

    def _hvp_autograd(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> list[Tensor | None]:
        c = vs[0].shape[0]
        out: list[Tensor | None] = [None] * len(self.params)
        with torch.enable_grad():
            live, gs = self._gradient_graph(inputs, targets)
            if not live:
                return out
            ps = [self.params[i] for i in live]
            keep = self._cached is not None  # the cached graph must survive these products
            try:
                hv = torch.autograd.grad(
                    gs,
                    ps,
                    grad_outputs=[vs[i] for i in live],
                    is_grads_batched=True,
                    allow_unused=True,
                    retain_graph=keep,
                )
            except RuntimeError:  # an op without a batching rule: one double-backward per column
                cols = [
                    torch.autograd.grad(
                        gs, ps, grad_outputs=[vs[i][j] for i in live], retain_graph=keep or j + 1 < c, allow_unused=True
                    )
                    for j in range(c)
                ]
                hv = tuple(
                    None if cols[0][a] is None else torch.stack([col[a] for col in cols]) for a in range(len(live))
                )
        for i, h in zip(live, hv, strict=True):
            out[i] = h
        return out

    def _hvp_func(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> list[Tensor | None]:
        f = self.functional_outputs(inputs)
        loss_fn = self.loss_fn
        primals = tuple(p.detach() for p in self.params)

        def loss(*ps: Tensor) -> Tensor:
            return loss_fn(f(*ps), targets)

        grad = torch.func.grad(loss, argnums=tuple(range(len(primals))))
        # reverse-over-reverse: H is symmetric, so the vjp of the gradient is H v; ONE forward and
        # backward pass, then the double-backward vmap-ed over the columns
        _, vjp_fn = torch.func.vjp(grad, *primals)
        return list(torch.func.vmap(lambda *v: vjp_fn(v))(*vs))


def _tensors(x: Any) -> list[Tensor]:
    """The tensors of ``x`` (a tensor, or nested tuples/lists/dicts; other leaves are ignored)."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []
