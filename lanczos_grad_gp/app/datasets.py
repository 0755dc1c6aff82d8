"""UCI regression data for examples, the command line and benchmarks.

Files are comma-separated numbers without a header, one row per example, the target in the
last column, optionally gzip-compressed (``.csv`` or ``.csv.gz``). The package bundles the
*concrete* set (1030 × 8) and a 5000-row *protein* sample (the demo's default; see
``lanczos_grad_gp/app/data/README.md`` for attribution). Larger sets are looked up in
``$LGG_DATA_DIR`` (or a ``shared/data/uci`` folder next to a development checkout); the
benchmarks' sets are bundled in the repository's ``benchmarks/data``.

Example:
    >>> from lanczos_grad_gp.app.datasets import load_default
    >>> data = load_default(n=200)
    >>> tuple(data.train_x.shape), tuple(data.test_x.shape)
    ((180, 8), (20, 8))
    >>> abs(float(data.train_y.mean())) < 1e-12, round(float(data.train_y.std()), 6)
    (True, 1.0)
"""

from __future__ import annotations

import gzip
import io
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_DATASET",
    "Dataset",
    "available_datasets",
    "bundled_data_path",
    "load_default",
    "load_uci",
    "min_rows",
    "non_finite_message",
    "read_table",
    "shared_data_dir",
    "split_sizes",
]

DEFAULT_DATASET = "concrete"
_ENV_DATA_DIR = "LGG_DATA_DIR"
_MAX_REPORTED_ROWS = 5


@dataclass(frozen=True)
class Dataset:
    """A z-scored train/test split of a regression data set.

    ``x`` columns and ``y`` are standardised with the *training* mean and standard deviation;
    ``y_mean`` and ``y_std`` map predictions back: ``y = y_z * y_std + y_mean``.

    Attributes:
        train_x: ``(n_train, d)`` standardised inputs.
        train_y: ``(n_train,)`` standardised targets.
        test_x: ``(n_test, d)`` inputs, standardised with the training statistics.
        test_y: ``(n_test,)`` targets, standardised with the training statistics.
        y_mean: training mean of the original targets.
        y_std: training standard deviation of the original targets.
        name: short name of the data set (the file stem for a path).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    y_mean: float
    y_std: float
    name: str

    @property
    def num_train(self) -> int:
        """Number of training rows."""
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        """Number of test rows."""
        return self.test_x.shape[0]

    @property
    def dim(self) -> int:
        """Number of input columns."""
        return self.train_x.shape[-1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dataset:
        """A copy with every tensor moved to ``device`` and/or cast to ``dtype``."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        return Dataset(
            move(self.train_x),
            move(self.train_y),
            move(self.test_x),
            move(self.test_y),
            self.y_mean,
            self.y_std,
            self.name,
        )


def bundled_data_path(name: str = DEFAULT_DATASET) -> Path:
    """Path of a data file bundled with the package (``lanczos_grad_gp/data/<name>.csv.gz``)."""
    return Path(str(resources.files("lanczos_grad_gp.app").joinpath("data", f"{name}.csv.gz")))


def shared_data_dir() -> Path | None:
    """``../shared/data/uci`` next to the repository root, or ``$LGG_DATA_DIR``; ``None`` if absent."""
    env = os.environ.get(_ENV_DATA_DIR)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "uci")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def available_datasets() -> list[str]:
    """Names :func:`load_uci` accepts: the bundled sets plus those found by :func:`shared_data_dir`."""
    data_dir = bundled_data_path().parent
    names = {p.name.removesuffix(".csv.gz") for p in data_dir.glob("*.csv.gz") if "_test_mask" not in p.name}
    root = shared_data_dir()
    if root is not None:
        names.update(p.parent.name for p in root.glob("*/data.csv*"))
    return sorted(names)


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path, str]:
    """File path and short name for a data-set name, a file, or a directory holding ``data.csv[.gz]``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for fname in ("data.csv.gz", "data.csv"):
            if (path / fname).is_file():
                return path / fname, path.name
        raise FileNotFoundError(f"No data.csv or data.csv.gz in directory {str(path)!r}.")
    if path.is_file():
        stem = path.name.removesuffix(".gz").removesuffix(".csv")
        return path, path.parent.name if stem == "data" else stem
    name = str(name_or_path)
    if os.sep not in name and "." not in name:
        if bundled_data_path(name).is_file():
            return bundled_data_path(name), name
        root = shared_data_dir()
        if root is not None and (root / name).is_dir():
            return _resolve(root / name)
        raise FileNotFoundError(f"Unknown data set {name!r}; available: {', '.join(available_datasets())}.")
    raise FileNotFoundError(f"Data file not found: {str(path)!r}.")


def non_finite_message(path: str | os.PathLike, cells: list[tuple[int, int]], num_columns: int) -> str:
    """Error message for non-finite ``(line, column)`` cells (both 1-based) of the table at ``path``.

    Example:
        >>> print(non_finite_message("d.csv", [(3, 2), (7, 2)], num_columns=4))
        d.csv: NaN or Inf in row(s) 3, 7 (file lines), column(s) 2; drop or impute those rows first.
    """
    lines = sorted({line for line, _ in cells})
    columns = sorted({column for _, column in cells})
    shown = ", ".join(map(str, lines[:_MAX_REPORTED_ROWS]))
    if len(lines) > _MAX_REPORTED_ROWS:
        shown += f", ... ({len(lines)} rows in all)"
    target = f" (column {num_columns} is the target)" if num_columns in columns else ""
    return (
        f"{path}: NaN or Inf in row(s) {shown} (file lines), column(s) {', '.join(map(str, columns))}{target}; "
        "drop or impute those rows first."
    )


def read_table(path: str | os.PathLike, dtype: torch.dtype = torch.float64) -> Tensor:
    """Read a header-less comma-separated numeric table (``.csv`` or gzip ``.csv.gz``) as a 2-D tensor.

    Raises:
        ValueError: a non-numeric or non-finite (NaN, Inf) entry, ragged rows, or an empty file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    rows: list[list[float]] = []
    non_finite: list[tuple[int, int]] = []
    for lineno, line in enumerate(io.StringIO(raw.decode("utf-8")), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append([float(tok) for tok in line.split(",")])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected comma-separated numbers without a header.") from None
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(f"{path}:{lineno}: {len(rows[-1])} columns, but the first row has {len(rows[0])}.")
        non_finite += [(lineno, col) for col, value in enumerate(rows[-1], start=1) if not math.isfinite(value)]
    if not rows:
        raise ValueError(f"{path}: no data rows.")
    if non_finite:
        raise ValueError(non_finite_message(path, non_finite, len(rows[0])))
    return torch.tensor(rows, dtype=dtype)


def split_sizes(num_rows: int, test_fraction: float) -> tuple[int, int]:
    """``(n_train, n_test)`` of :func:`load_uci`'s random split: the last ``round(test_fraction · num_rows)`` test.

    Example:
        >>> split_sizes(5, 0.1), split_sizes(6, 0.1), split_sizes(1030, 0.1)
        ((5, 0), (5, 1), (927, 103))
    """
    num_test = round(test_fraction * num_rows)
    return num_rows - num_test, num_test


def min_rows(test_fraction: float, *, min_train: int = 2, min_test: int = 1) -> int:
    """Smallest row count whose :func:`split_sizes` has ``min_train`` training and ``min_test`` test rows.

    Example:
        >>> min_rows(0.1), min_rows(0.5), min_rows(0.9)
        (6, 4, 16)

    Raises:
        ValueError: ``test_fraction`` outside ``(0, 1)`` with ``min_test > 0``, or outside ``[0, 1)``.
    """
    if not (0 < test_fraction < 1 if min_test > 0 else 0 <= test_fraction < 1):
        raise ValueError(f"no row count gives {min_test} test rows at test_fraction {test_fraction!r}.")
    # lower bounds from |round(x) - x| <= 1/2, then step up over the rounding (both sizes grow with num_rows)
    num_rows = max(min_train + min_test, math.floor((min_train - 0.5) / (1 - test_fraction)))
    if test_fraction > 0:
        num_rows = max(num_rows, math.floor((min_test - 0.5) / test_fraction))
    while True:
        num_train, num_test = split_sizes(num_rows, test_fraction)
        if num_train >= min_train and num_test >= min_test:
            return num_rows
        num_rows += 1


def _test_mask(data_path: Path, split: int, num_rows: int) -> Tensor:
    """Boolean test mask of standard split ``split`` from the ``test_mask`` file next to ``data_path``."""
    stem = data_path.name.removesuffix(".gz").removesuffix(".csv")
    prefix = "" if stem == "data" else f"{stem}_"
    for suffix in (".csv.gz", ".csv"):
        mask_path = data_path.parent / f"{prefix}test_mask{suffix}"
        if mask_path.is_file():
            masks = read_table(mask_path)
            break
    else:
        raise FileNotFoundError(f"No test-mask file for {str(data_path)!r}; use split=None for a random split.")
    if masks.shape[0] != num_rows or not 0 <= split < masks.shape[1]:
        raise ValueError(f"split must be in [0, {masks.shape[1]}) and the mask must have {num_rows} rows.")
    return masks[:, split] != 0


def _standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Z-score both with ``train``'s column statistics (constant columns get scale 1)."""
    mean = train.mean(0)
    std = train.std(0) if train.shape[0] > 1 else torch.ones_like(mean)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std, mean, std


def load_uci(
    name_or_path: str | os.PathLike = DEFAULT_DATASET,
    *,
    n: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
    split: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> Dataset:
    """Load a UCI-style regression table, shuffle, subsample, split and z-score it.

    Steps: read all rows; shuffle them with a ``torch.Generator`` seeded by ``seed``; keep the
    first ``n``; put the last ``round(test_fraction · n)`` in the test set (or, with ``split``, the
    rows the standard test mask marks); z-score ``x`` and ``y`` with the training statistics.

    Args:
        name_or_path: a data-set name (``"concrete"`` is bundled; others are looked up in
            :func:`shared_data_dir`), a ``.csv``/``.csv.gz`` file, or a directory with ``data.csv.gz``.
        n: number of rows to use (train + test); ``None`` for all.
        seed: seed of the shuffling permutation.
        test_fraction: share of the rows held out for testing, in ``[0, 1)``.
        split: index of a standard split from the ``test_mask`` file (overrides ``test_fraction``).
        dtype: floating dtype of the returned tensors.

    Raises:
        FileNotFoundError: unknown name or missing file.
        ValueError: bad ``n``/``test_fraction``, a malformed file, or fewer than 2 training rows.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise ValueError(f"n must be an integer >= 2 or None; got {n!r}.")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction!r}.")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype; got {dtype}.")
    path, name = _resolve(name_or_path)
    table = read_table(path)
    if table.shape[1] < 2:
        raise ValueError(f"{path}: need at least one input column and the target column.")
    perm = torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(seed))
    perm = perm[: n if n is not None else table.shape[0]]
    rows = table[perm]
    if split is not None:
        is_test = _test_mask(path, split, table.shape[0])[perm]
    else:
        num_test = split_sizes(rows.shape[0], test_fraction)[1]
        is_test = torch.arange(rows.shape[0]) >= rows.shape[0] - num_test
    train, test = rows[~is_test], rows[is_test]
    if train.shape[0] < 2:
        raise ValueError(f"Only {train.shape[0]} training rows; use a larger n or a smaller test_fraction.")
    train_x, test_x, _, _ = _standardize(train[:, :-1], test[:, :-1])
    train_y, test_y, y_mean, y_std = _standardize(train[:, -1:], test[:, -1:])
    return Dataset(
        train_x=train_x.to(dtype),
        train_y=train_y.squeeze(-1).to(dtype),
        test_x=test_x.to(dtype),
        test_y=test_y.squeeze(-1).to(dtype),
        y_mean=float(y_mean),
        y_std=float(y_std),
        name=name,
    )


def load_default(
    *, n: int | None = None, seed: int = 0, test_fraction: float = 0.1, dtype: torch.dtype = torch.float64
) -> Dataset:
    """The bundled *concrete* data set (1030 × 8), via :func:`load_uci`."""
    return load_uci(bundled_data_path(), n=n, seed=seed, test_fraction=test_fraction, dtype=dtype)
