"""Where the time goes: kernel-operator products of one MLL + gradient, ours against GPyTorch's default.

python -m benchmarks.operator_products --datasets elevators pol --n 5000 --noise 0.1 0.01

Counts every product ``(K + σ² I) @ X`` (``AddedDiagLinearOperator._matmul``, which both our Lanczos
loop and GPyTorch's mBCG call once per step), groups them by the number of columns of ``X``, and
times them, next to the wall time of the whole forward + backward. Each method is run once to warm
up (layout tuning, cost-ratio measurement), then measured. Writes ``<out>.md``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch
from linear_operator.operators import AddedDiagLinearOperator
from torch import Tensor

from .common import DEFAULT_DATA_DIR, REPO_ROOT, FixedGP, load_data, make_model, mll_and_grad, rel


def count_products(model: FixedGP, method: str) -> tuple[float, float, Counter, Tensor]:
    """``(wall s, seconds in products, Counter{columns: calls}, gradient)`` of one MLL + gradient."""
    original = AddedDiagLinearOperator._matmul
    widths: Counter = Counter()
    spent = [0.0]

    def counted(self: AddedDiagLinearOperator, rhs: Tensor) -> Tensor:
        t0 = time.perf_counter()
        out = original(self, rhs)
        spent[0] += time.perf_counter() - t0
        widths[rhs.shape[-1] if rhs.dim() > 1 else 1] += 1
        return out

    AddedDiagLinearOperator._matmul = counted
    try:
        t0 = time.perf_counter()
        _, grad, _ = mll_and_grad(model, method)
        wall = time.perf_counter() - t0
    finally:
        AddedDiagLinearOperator._matmul = original
    return wall, spent[0], widths, grad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["elevators", "pol"])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--methods", nargs="+", default=["ours", "gpytorch"])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "operator_products")
    args = p.parse_args(argv)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, n = {args.n}\n",
        "| data set | noise | method | wall s | in products s | products (columns × calls) | grad rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset in args.datasets:
        x, y = load_data(dataset, args.n, dtype=torch.float64, device="cpu", data_dir=DEFAULT_DATA_DIR)
        for noise in args.noise:
            model = make_model(x, y, noise)
            _, ref, _ = mll_and_grad(model, "cholesky")
            for method in args.methods:
                mll_and_grad(model, method)  # warm-up
                wall, spent, widths, grad = count_products(model, method)
                shown = ", ".join(f"{c}×{k}" for c, k in sorted(widths.items()))
                line = f"| {dataset} | {noise} | {method} | {wall:.2f} | {spent:.2f} | {shown} | {rel(grad, ref):.1e} |"
                print(line, flush=True)
                lines.append(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
