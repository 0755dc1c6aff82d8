"""The benchmark data bundled in ``benchmarks/data/``: hashes, shapes, and the README that documents them.

Skips (with the reason) when the folder is absent, e.g. in a source distribution without it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lanczos_grad_gp.app.datasets import load_uci, read_table

DATA_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
#: set -> (rows, columns of data.csv.gz including the target)
SHAPES = {"protein": (45730, 10), "elevators": (16599, 19), "kin40k": (40000, 9), "pol": (15000, 27)}

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "SHA256SUMS").is_file(),
    reason=f"bundled benchmark data not present ({DATA_DIR}/SHA256SUMS missing)",
)


def _checksums() -> dict[str, str]:
    """``relative path -> sha256`` from ``SHA256SUMS`` (``sha256sum`` format)."""
    sums = {}
    for line in (DATA_DIR / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def test_checksum_file_lists_every_bundled_file() -> None:
    on_disk = sorted(p.relative_to(DATA_DIR).as_posix() for p in DATA_DIR.rglob("*.csv.gz"))
    expected = sorted(f"{name}/{f}" for name in SHAPES for f in ("data.csv.gz", "test_mask.csv.gz"))
    assert on_disk == expected
    assert sorted(_checksums()) == expected


@pytest.mark.parametrize("name", sorted(_checksums()) if (DATA_DIR / "SHA256SUMS").is_file() else [])
def test_sha256_matches_and_is_documented(name: str) -> None:
    digest = hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest()
    assert digest == _checksums()[name], f"{name}: SHA-256 {digest} differs from SHA256SUMS"
    assert digest in (DATA_DIR / "README.md").read_text(), f"{name}: its SHA-256 is not in benchmarks/data/README.md"


@pytest.mark.parametrize("dataset", sorted(SHAPES))
def test_shapes_and_masks(dataset: str) -> None:
    rows, cols = SHAPES[dataset]
    table = read_table(DATA_DIR / dataset / "data.csv.gz")  # also rejects NaN / Inf / ragged rows
    assert tuple(table.shape) == (rows, cols)
    masks = read_table(DATA_DIR / dataset / "test_mask.csv.gz")
    assert tuple(masks.shape) == (rows, 10)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    share = masks.mean(0)
    assert bool(((share > 0.09) & (share < 0.11)).all()), "each standard split holds out about 10%"
    readme = (DATA_DIR / "README.md").read_text()
    assert f"| {dataset} | {rows} | {cols} (" in readme


def test_loads_by_path_as_the_benchmarks_do() -> None:
    data = load_uci(DATA_DIR / "protein", n=200, seed=0, test_fraction=0.0)
    assert data.name == "protein" and tuple(data.train_x.shape) == (200, 9)
    assert abs(float(data.train_y.mean())) < 1e-12


def test_benchmarks_default_to_the_bundled_data() -> None:
    common = pytest.importorskip("benchmarks.common")
    assert common.DEFAULT_DATA_DIR == DATA_DIR
    with pytest.raises(FileNotFoundError, match="bundled"):
        common.dataset_dir(DATA_DIR, "no_such_set")
