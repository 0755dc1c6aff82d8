"""One MLL + gradient with the dense-product layout tuning off and on, alternated, in one process.

python -m benchmarks.dense_layout_ab --datasets elevators protein --n 5000 --noise 0.1
"""

from __future__ import annotations

import argparse
import time

import torch

from lanczos_grad_gp.core import dense_matmul

from .common import DEFAULT_DATA_DIR, load_data, make_model, mll_and_grad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["elevators", "protein"])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--noise", type=float, default=0.1)
    args = p.parse_args(argv)
    tuned_size = dense_matmul.TUNE_MIN_SIZE
    try:
        for dataset in args.datasets:
            x, y = load_data(dataset, args.n, dtype=torch.float64, device="cpu", data_dir=DEFAULT_DATA_DIR)
            model = make_model(x, y, args.noise)
            times: dict[str, list[float]] = {"plain": [], "tuned": []}
            for label in ("plain", "tuned", "plain", "tuned"):
                dense_matmul.TUNE_MIN_SIZE = 10**9 if label == "plain" else tuned_size
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    mll_and_grad(model, "ours")
                    best = min(best, time.perf_counter() - t0)
                times[label].append(best)
            shown = {k: ", ".join(f"{t:.2f}" for t in v) for k, v in times.items()}
            print(f"{dataset}: plain {shown['plain']} s, tuned {shown['tuned']} s; {dense_matmul.layout_choices()}")
    finally:
        dense_matmul.TUNE_MIN_SIZE = tuned_size


if __name__ == "__main__":
    main()
