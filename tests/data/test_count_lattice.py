"""The count lattice: sub-count predicted values become 0 or one count, with the expectation kept."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from bionemo_scale.cli import main
from bionemo_scale.config import SynthConfig
from bionemo_scale.data.count_lattice import one_count_level, put_on_lattice, sample_sub_count, source_levels
from bionemo_scale.data.synth import write_synthetic_dataset


def test_one_count_level_is_the_smallest_nonzero_value() -> None:
    cells = np.array([[0.0, 0.7, 2.0], [1.1, 0.0, 0.9], [0.0, 0.0, 0.0]])
    # the empty cell takes the median level of the others (0.7 and 0.9)
    np.testing.assert_allclose(one_count_level(cells), [0.7, 0.9, 0.8])
    assert np.isnan(one_count_level(np.zeros((2, 3)))).all()
    # the sparse path (files are CSR) agrees, empty rows included
    import scipy.sparse as sp

    np.testing.assert_allclose(one_count_level(sp.csr_matrix(cells)), [0.7, 0.9, 0.8])
    np.testing.assert_allclose(one_count_level(sp.csr_matrix(cells[[2, 0, 2, 1]])), [0.8, 0.7, 0.8, 0.9])


def test_sub_count_values_land_on_zero_or_one_count_and_the_rest_is_untouched() -> None:
    rng = np.random.default_rng(0)
    level = np.array([0.5, 1.0])
    x = np.array([[0.0, 0.01, 0.3, 0.5, 2.0], [0.99, 1.0, 1e-6, 0.0, 3.0]], dtype=np.float32)
    out = sample_sub_count(x, level, rng)
    assert out.dtype == x.dtype and out.shape == x.shape
    sub = (x > 0) & (x < level[:, None])
    assert np.all(np.isin(out[0][sub[0]], [0.0, 0.5])) and np.all(np.isin(out[1][sub[1]], [0.0, 1.0]))
    np.testing.assert_array_equal(out[~sub], x[~sub])  # zeros and values at or above one count
    assert not np.shares_memory(out, x)


def test_the_expected_linear_expression_is_kept() -> None:
    """Many draws of one sub-count value: the mean of expm1 matches expm1(x) within 4 standard
    errors, and the log-space mean shrinks (to L·expm1(x)/expm1(L), not x)."""
    level, value, n = 0.6, 0.05, 200_000
    x = np.full((n, 1), value)
    out = sample_sub_count(x, np.full(n, level), np.random.default_rng(1))
    p = np.expm1(value) / np.expm1(level)
    se = np.expm1(level) * np.sqrt(p * (1 - p) / n)
    assert abs(np.expm1(out).mean() - np.expm1(value)) < 4 * se
    assert abs(out.mean() - level * p) < 4 * level * np.sqrt(p * (1 - p) / n) and out.mean() < 0.8 * value
    assert set(np.unique(out)) == {0.0, level}


def test_draws_are_positional() -> None:
    """A changed value changes its own outcome only, not the draws of the values after it."""
    level = np.full(40, 1.0)
    x = np.full((40, 30), 0.5)
    y = x.copy()
    y[0, 0] = 2.0  # no longer sub-count
    a = sample_sub_count(x, level, np.random.default_rng(5))
    b = sample_sub_count(y, level, np.random.default_rng(5))
    same = np.ones_like(x, dtype=bool)
    same[0, 0] = False
    np.testing.assert_array_equal(a[same], b[same])


def test_cells_without_a_known_level_are_left_alone() -> None:
    x = np.array([[0.01, 0.2]])
    np.testing.assert_array_equal(sample_sub_count(x, np.array([np.nan]), np.random.default_rng(0)), x)
    with pytest.raises(ValueError, match="level"):
        sample_sub_count(x, np.array([0.5, 0.5]), np.random.default_rng(0))


def test_draws_depend_on_seed_and_group_only() -> None:
    ctrl = np.tile([[0.0, 0.4, 1.0]], (50, 1))
    pred = np.tile([[0.2, 0.1, 1.5]], (50, 1))
    a, b = put_on_lattice(pred, ctrl, seed=3, group=7), put_on_lattice(pred, ctrl, seed=3, group=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, put_on_lattice(pred, ctrl, seed=3, group=8))
    assert set(np.unique(a[:, :2])) <= {0.0, 0.4} and np.all(a[:, 2] == 1.5)


# -- through the commands ---------------------------------------------------------------------
SMALL = SynthConfig(
    n_cells=3000, n_genes=60, n_programs=4, n_contexts=3, n_batches=1, n_perturbations=6, chunk_rows=900
)


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lattice")
    write_synthetic_dataset(root / "ds", SMALL, progress=False)
    split = root / "split.toml"
    split.write_text('[fewshot.C0]\nval = []\ntest = ["P001", "P002"]\n')
    return root / "ds", split


def _baseline(screen, out: Path, *extra: str) -> ad.AnnData:
    data, split = screen
    rc = main(["-q", "baseline", "--method", "additive", "--data", str(data), "--split", str(split),
               "--output", str(out), "--set-size", "16", *extra])  # fmt: skip
    assert rc == 0
    return ad.read_h5ad(out)


def _levels(pred: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """(predicted cells [n, G], one-count level of each one's source control cell [n])."""
    is_pred = pred.obs["is_prediction"].to_numpy()
    return pred.X.toarray()[is_pred], source_levels(pred)


def test_source_levels_are_the_source_control_cells_levels(screen, tmp_path: Path) -> None:
    pred = _baseline(screen, tmp_path / "plain" / "PRED.h5ad")
    is_pred = pred.obs["is_prediction"].to_numpy()
    rows = pred.obs["source_row"].to_numpy()
    X = pred.X.toarray()
    by_hand = {r: X[~is_pred][i][X[~is_pred][i] > 0].min() for i, r in enumerate(rows[~is_pred])}
    np.testing.assert_allclose(source_levels(pred), [by_hand[r] for r in rows[is_pred]], rtol=1e-6)
    assert len(set(np.round(source_levels(pred), 6))) > 5  # cells differ: levels are per cell, not one constant


def test_baseline_with_the_lattice_has_no_sub_count_values(screen, tmp_path: Path) -> None:
    plain = _baseline(screen, tmp_path / "plain" / "PRED.h5ad")
    latt = _baseline(screen, tmp_path / "latt" / "PRED.h5ad", "--count-lattice")
    x_plain, level = _levels(plain)
    x_latt, _ = _levels(latt)
    sub = (x_plain > 0) & (x_plain < level[:, None])
    assert sub.mean() > 0.05, "the fixture must have sub-count values, or the test proves nothing"
    assert not ((x_latt > 0) & (x_latt < level[:, None] - 1e-6)).any()
    np.testing.assert_array_equal(x_latt[~sub], x_plain[~sub])
    assert latt.uns["bionemo_scale"]["count_lattice"] and not plain.uns["bionemo_scale"]["count_lattice"]
    # linear pseudobulk means move by sampling noise only
    assert np.abs(np.expm1(x_latt).mean(0) - np.expm1(x_plain).mean(0)).max() < 0.2


def test_a_file_is_put_on_the_lattice_group_by_group(screen, tmp_path: Path) -> None:
    """lattice_of_file: per-group draws (a group's result does not depend on the other groups),
    and cells whose control is missing from the file take the controls' median level."""
    from bionemo_scale.data.count_lattice import lattice_of_file

    pred = _baseline(screen, tmp_path / "plain" / "PRED.h5ad")
    full = lattice_of_file(pred, seed=0).toarray()
    is_pred = pred.obs["is_prediction"].to_numpy()
    first = pred.obs["perturbation"].astype(str).to_numpy() == "P001"
    keep = (first & is_pred) | ~is_pred
    alone = lattice_of_file(pred[keep].copy(), seed=0).toarray()
    np.testing.assert_array_equal(alone[: (first & is_pred).sum()], full[first & is_pred])
    _, level = _levels(pred)
    assert not ((full[is_pred] > 0) & (full[is_pred] < level[:, None] - 1e-6)).any()
    # a predicted cell whose control cell is not in the file still lands on a lattice
    orphan = pred.copy()
    orphan.obs["source_row"] = orphan.obs["source_row"].to_numpy() + np.where(is_pred, 10**9, 0)
    out = lattice_of_file(orphan, seed=0).toarray()[is_pred]
    median = np.median(one_count_level(pred.X[~is_pred]))
    assert not ((out > 0) & (out < median - 1e-6)).any()


def test_ensemble_puts_the_mean_back_on_the_lattice(screen, tmp_path: Path) -> None:
    a = tmp_path / "a" / "PRED.h5ad"
    b = tmp_path / "b" / "PRED.h5ad"
    _baseline(screen, a, "--count-lattice")
    data, split = screen
    assert main(["-q", "baseline", "--method", "context-mean", "--data", str(data), "--split", str(split),
                 "--output", str(b), "--set-size", "16", "--count-lattice"]) == 0  # fmt: skip
    out = tmp_path / "ens" / "PRED.h5ad"
    assert main(["-q", "ensemble", str(a), str(b), "--output", str(out)]) == 0
    x, level = _levels(ad.read_h5ad(out))
    assert not ((x > 0) & (x < level[:, None] - 1e-6)).any()
    mean, _ = _levels(ad.read_h5ad(a))
    mean = (mean + _levels(ad.read_h5ad(b))[0]) / 2
    keep = ~((mean > 0) & (mean < level[:, None]))
    np.testing.assert_allclose(x[keep], mean[keep], rtol=1e-6, atol=1e-6)
