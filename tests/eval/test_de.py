"""Differential expression: our vectorised MWU/BH/log2FC against scipy and by-hand references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import mannwhitneyu

from bionemo_scale.eval.de import (
    benjamini_hochberg,
    differential_expression,
    log2_fold_change,
    percent_change,
)


def _bh_by_hand(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg written out: q_(i) = min_{j>=i} p_(j) * m / j, capped at 1."""
    m = p.size
    order = sorted(range(m), key=lambda i: p[i])
    q = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return np.array(q)


def _screen(rng: np.random.Generator, sizes: dict[str, int], n_genes: int, *, negative: bool = False) -> tuple:
    """Tie-heavy data: rounded values with many zeros (and negatives when asked)."""
    labels = np.concatenate([[name] * n for name, n in sizes.items()])
    X = rng.poisson(0.8, size=(labels.size, n_genes)).astype(np.float64)
    X *= rng.choice([0.5, 1.0, 1.5], size=(labels.size, 1))  # ties inside and across groups
    if negative:
        X -= rng.poisson(0.3, size=X.shape)
    X[:, 0] = 0.0  # a gene with no expression anywhere
    X[labels == "ctrl", 1] = 2.0  # constant in the control
    return X, labels


def _reference_mwu(X, labels, control, target):
    x, y = X[labels == target], X[labels == control]
    u, p = np.empty(X.shape[1]), np.empty(X.shape[1])
    for j in range(X.shape[1]):
        if np.all(np.concatenate([x[:, j], y[:, j]]) == x[0, j]):
            u[j], p[j] = x.shape[0] * y.shape[0] / 2.0, 1.0  # scipy returns NaN; pdex defines 1
            continue
        res = mannwhitneyu(x[:, j], y[:, j], alternative="two-sided", method="asymptotic", use_continuity=True)
        u[j], p[j] = res.statistic, res.pvalue
    return u, p


@pytest.mark.parametrize("layout", ["dense", "sparse", "dense_float32", "dense_negative"])
def test_mwu_matches_scipy_per_gene(rng, layout):
    sizes = {"ctrl": 40, "A": 13, "B": 13, "C": 7, "D": 25, "E": 1}
    X, labels = _screen(rng, sizes, 30, negative=layout == "dense_negative")
    if layout == "dense_float32":
        X = X.astype(np.float32)
    data = sp.csr_matrix(X) if layout == "sparse" else X
    res = differential_expression(data, labels, "ctrl", np.arange(30).astype(str))
    assert list(res.targets) == ["A", "B", "C", "D", "E"]
    assert list(res.n_target) == [13, 13, 7, 25, 1] and res.n_ref == 40
    for i, target in enumerate(res.targets):
        u, p = _reference_mwu(X.astype(np.float64), labels, "ctrl", target)
        np.testing.assert_array_equal(res.statistic[i], u)
        np.testing.assert_allclose(res.p_value[i], p, rtol=1e-12, atol=0)
    assert (res.p_value[:, 0] == 1.0).all()  # all-zero gene: no evidence


def test_sparse_and_dense_agree_bitwise(rng):
    X, labels = _screen(rng, {"ctrl": 30, "A": 11, "B": 17}, 20)
    Xs = sp.csr_matrix(X)
    Xs.data[::7] = 0.0  # explicit stored zeros must count as zeros
    dense = differential_expression(X, labels, "ctrl", np.arange(20).astype(str))
    sparse = differential_expression(Xs, labels, "ctrl", np.arange(20).astype(str))
    X2 = Xs.toarray()
    dense2 = differential_expression(X2, labels, "ctrl", np.arange(20).astype(str))
    np.testing.assert_array_equal(sparse.statistic, dense2.statistic)
    np.testing.assert_array_equal(sparse.p_value, dense2.p_value)
    assert not np.array_equal(dense.statistic, dense2.statistic)  # the zeros did change the data


def test_other_labels_are_ignored(rng):
    X, labels = _screen(rng, {"ctrl": 20, "A": 10, "B": 10}, 8)
    full = differential_expression(X, labels, "ctrl", np.arange(8).astype(str))
    only_a = differential_expression(X, labels, "ctrl", np.arange(8).astype(str), targets=np.array(["A"]))
    np.testing.assert_array_equal(only_a.p_value[0], full.p_value[0])


def test_bh_matches_hand_written(rng):
    p = rng.uniform(size=(3, 50)) ** 3
    p[0, :5] = p[0, 5]  # ties
    q = benjamini_hochberg(p)
    for row in range(3):
        np.testing.assert_allclose(q[row], _bh_by_hand(p[row]), rtol=1e-15)
    assert (q >= p).all() and (q <= 1).all()


def test_fdr_is_bh_of_pvalues(rng):
    X, labels = _screen(rng, {"ctrl": 30, "A": 15}, 40)
    res = differential_expression(X, labels, "ctrl", np.arange(40).astype(str))
    np.testing.assert_allclose(res.fdr[0], _bh_by_hand(res.p_value[0]), rtol=1e-15)


def test_log2_fold_change_conventions():
    t = np.array([0.0, 1.0, 0.0, 3.0])
    r = np.array([0.0, 0.0, 2.0, 1.5])
    lfc = log2_fold_change(t, r)
    assert lfc[0] == 0.0  # unexpressed on both sides: no change
    assert lfc[1] == np.inf and lfc[2] == -np.inf  # one-sided zeros stay infinite (epsilon 0)
    assert lfc[3] == pytest.approx(1.0)
    np.testing.assert_allclose(percent_change(t, r)[[0, 3]], [0.0, 1.0])


def test_log2fc_is_on_expm1_of_mean_log1p(rng):
    X, labels = _screen(rng, {"ctrl": 20, "A": 10}, 5)
    X = np.log1p(X)
    res = differential_expression(X, labels, "ctrl", np.arange(5).astype(str))
    t = np.expm1(X[labels == "A"].mean(0))
    c = np.expm1(X[labels == "ctrl"].mean(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        expect = np.nan_to_num(np.log2(t / c), nan=0.0, posinf=np.inf, neginf=-np.inf)
    np.testing.assert_allclose(res.log2_fold_change[0], expect, rtol=1e-12)


def test_significance_uses_float32_like_cell_eval():
    from bionemo_scale.eval.de import DEResult

    fdr = np.array([[0.05, np.nextafter(0.05, 0), 0.04999999]])
    res = DEResult(
        targets=np.array(["A"]),
        genes=np.array(["g0", "g1", "g2"]),
        target_mean=np.zeros((1, 3)),
        ref_mean=np.zeros(3),
        n_target=np.array([1]),
        n_ref=1,
        log2_fold_change=np.zeros((1, 3)),
        percent_change=np.zeros((1, 3)),
        p_value=fdr,
        statistic=np.zeros((1, 3)),
        fdr=fdr,
    )
    # float32(0.05 - 1ulp64) == float32(0.05), so it is *not* below the threshold.
    assert res.significant(0.05).tolist() == [[False, False, True]]
    frame = res.to_frame()
    assert list(frame.columns[:2]) == ["target", "feature"] and len(frame) == 3


def test_no_control_cells_is_an_error(rng):
    X, labels = _screen(rng, {"A": 5, "B": 5}, 4)
    with pytest.raises(ValueError, match="no control cells"):
        differential_expression(X, labels, "ctrl", np.arange(4).astype(str))
