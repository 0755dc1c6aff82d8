"""Tests of lanczos_grad_gp.app.datasets: reading, shuffling, splitting, z-scoring, seeding."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from lanczos_grad_gp.app.datasets import (
    Dataset,
    available_datasets,
    bundled_data_path,
    load_default,
    load_uci,
    min_rows,
    read_table,
    shared_data_dir,
    split_sizes,
)


def _write_csv(path: Path, table: torch.Tensor, compress: bool = False) -> Path:
    text = "\n".join(",".join(repr(float(v)) for v in row) for row in table) + "\n"
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture
def table() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    y = x.sum(-1, keepdim=True) + 100
    return torch.cat([x, y], dim=-1)


def test_bundled_file_is_packaged() -> None:
    path = bundled_data_path()
    assert path.is_file() and path.name == "concrete.csv.gz"
    assert (path.parent / "README.md").is_file()
    raw = read_table(path)
    assert raw.shape == (1030, 9)
    assert bool(torch.isfinite(raw).all())


def test_load_default_shapes_and_standardisation() -> None:
    data = load_default()
    assert isinstance(data, Dataset) and data.name == "concrete"
    assert (data.num_train, data.num_test, data.dim) == (927, 103, 8)
    assert data.train_x.dtype == torch.float64
    torch.testing.assert_close(data.train_x.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(data.train_x.std(0), torch.ones(8, dtype=torch.float64))
    assert abs(float(data.train_y.mean())) < 1e-12 and abs(float(data.train_y.std()) - 1) < 1e-12
    # strength in MPa, stored mean-centred by uci_datasets: std about 17 (original scale, not z-scored)
    assert abs(data.y_mean) < 3 and 12 < data.y_std < 22


def test_test_set_uses_train_statistics(tmp_path: Path, table: torch.Tensor) -> None:
    data = load_uci(_write_csv(tmp_path / "toy.csv", table), test_fraction=0.2, seed=3)
    assert (data.num_train, data.num_test) == (40, 10)
    assert data.name == "toy"
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    raw_train, raw_test = table[perm[:40]], table[perm[40:]]
    mean, std = raw_train.mean(0), raw_train.std(0)
    torch.testing.assert_close(data.test_x, (raw_test[:, :-1] - mean[:-1]) / std[:-1])
    torch.testing.assert_close(data.test_y * data.y_std + data.y_mean, raw_test[:, -1])
    torch.testing.assert_close(data.train_y * data.y_std + data.y_mean, raw_train[:, -1])


def test_n_subsamples_before_splitting(tmp_path: Path, table: torch.Tensor) -> None:
    path = _write_csv(tmp_path / "toy.csv.gz", table, compress=True)
    data = load_uci(path, n=20)
    assert (data.num_train, data.num_test) == (18, 2)
    data = load_uci(path, n=20, test_fraction=0.0)
    assert (data.num_train, data.num_test) == (20, 0)


def test_seeded(tmp_path: Path, table: torch.Tensor) -> None:
    path = _write_csv(tmp_path / "toy.csv", table)
    a, b, c = load_uci(path, seed=0), load_uci(path, seed=0), load_uci(path, seed=1)
    torch.testing.assert_close(a.train_x, b.train_x)
    torch.testing.assert_close(a.test_y, b.test_y)
    assert not torch.equal(a.train_y, c.train_y)


def test_dtype_and_to(tmp_path: Path, table: torch.Tensor) -> None:
    data = load_uci(_write_csv(tmp_path / "toy.csv", table), dtype=torch.float32)
    assert data.train_x.dtype == data.test_y.dtype == torch.float32
    moved = data.to(dtype=torch.float64)
    assert moved.train_x.dtype == torch.float64 and moved.y_std == data.y_std


def test_constant_column_does_not_divide_by_zero(tmp_path: Path, table: torch.Tensor) -> None:
    table = table.clone()
    table[:, 1] = 7.0
    data = load_uci(_write_csv(tmp_path / "toy.csv", table))
    assert bool(torch.isfinite(data.train_x).all()) and bool((data.train_x[:, 1] == 0).all())


def test_standard_split_mask() -> None:
    mask = read_table(bundled_data_path().parent / "concrete_test_mask.csv.gz")
    data = load_uci("concrete", split=0)
    assert data.num_test == int(mask[:, 0].sum())
    assert data.num_train + data.num_test == 1030


def test_directory_and_name(tmp_path: Path, table: torch.Tensor) -> None:
    folder = tmp_path / "toyset"
    folder.mkdir()
    _write_csv(folder / "data.csv.gz", table, compress=True)
    assert load_uci(folder).name == "toyset"
    assert load_uci("concrete", n=30).name == "concrete"
    assert "concrete" in available_datasets()


@pytest.mark.parametrize(
    ("contents", "message"),
    [("a,b,c\n1,2,3\n", "comma-separated numbers"), ("1,2,3\n1,2\n", "columns"), ("\n", "no data rows")],
)
def test_malformed_files(tmp_path: Path, contents: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(contents)
    with pytest.raises(ValueError, match=message):
        load_uci(path)


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-Infinity", "1e400"])
def test_non_finite_entries_are_rejected(tmp_path: Path, table: torch.Tensor, bad: str) -> None:
    lines = _write_csv(tmp_path / "ok.csv", table).read_text().splitlines()
    lines[4] = ",".join([*lines[4].split(",")[:-1], bad])  # target of row 5
    lines[11] = ",".join([lines[11].split(",")[0], bad, *lines[11].split(",")[2:]])  # column 2 of row 12
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(ValueError) as excinfo:
        load_uci(path)
    message = str(excinfo.value)
    assert str(path) in message and "NaN or Inf" in message
    assert "row(s) 5, 12 " in message and "column(s) 2, 4 (column 4 is the target)" in message
    assert "drop or impute" in message


def test_non_finite_message_lists_the_first_rows(tmp_path: Path, table: torch.Tensor) -> None:
    table = table.clone()
    table[10:30, 0] = float("nan")
    with pytest.raises(ValueError, match=r"row\(s\) 11, 12, 13, 14, 15, \.\.\. \(20 rows in all\)") as excinfo:
        load_uci(_write_csv(tmp_path / "many.csv", table))
    assert "column(s) 1;" in str(excinfo.value)


def test_split_sizes_and_min_rows() -> None:
    assert split_sizes(5, 0.1) == (5, 0) and split_sizes(20, 0.1) == (18, 2)
    for fraction in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        count = next(n for n in range(10_000) if split_sizes(n, fraction)[0] >= 2 and split_sizes(n, fraction)[1] >= 1)
        assert min_rows(fraction) == count, fraction
    assert min_rows(0.0, min_test=0) == 2
    with pytest.raises(ValueError, match="no row count"):
        min_rows(0.0)


def test_bad_arguments(tmp_path: Path, table: torch.Tensor) -> None:
    path = _write_csv(tmp_path / "toy.csv", table)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_uci(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="Unknown data set"):
        load_uci("no_such_dataset")
    with pytest.raises(ValueError, match="n must be"):
        load_uci(path, n=1)
    with pytest.raises(ValueError, match="test_fraction"):
        load_uci(path, test_fraction=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        load_uci(path, dtype=torch.int64)
    with pytest.raises(FileNotFoundError, match="test-mask"):
        load_uci(path, split=0)


def test_shared_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LGG_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("LGG_DATA_DIR", str(tmp_path / "absent"))
    found = shared_data_dir()
    assert found is None or found.name == "uci"


@pytest.mark.shared_data
def test_shared_protein() -> None:
    root = shared_data_dir()
    if root is None or not (root / "protein").is_dir():
        pytest.skip("../shared/data/uci/protein not present")
    data = load_uci("protein", n=1000)
    assert (data.num_train, data.num_test, data.dim) == (900, 100, 9)
