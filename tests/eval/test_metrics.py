"""Each metric on inputs small enough to check by hand (and against scipy/sklearn)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from bionemo_scale.eval import metrics as M
from bionemo_scale.eval._synthetic import make_pair
from bionemo_scale.eval.de import DEResult


def _de(lfc, fdr, targets=None, genes=None) -> DEResult:
    lfc = np.atleast_2d(np.asarray(lfc, dtype=np.float64))
    fdr = np.atleast_2d(np.asarray(fdr, dtype=np.float64))
    p, g = lfc.shape
    return DEResult(
        targets=np.array(targets or [f"P{i}" for i in range(p)]),
        genes=np.array(genes or [f"g{j}" for j in range(g)]),
        target_mean=np.zeros((p, g)),
        ref_mean=np.zeros(g),
        n_target=np.ones(p, dtype=int),
        n_ref=1,
        log2_fold_change=lfc,
        percent_change=np.zeros((p, g)),
        p_value=fdr,
        statistic=np.zeros((p, g)),
        fdr=fdr,
    )


S, N = 0.01, 0.5  # significant / not significant FDR


@pytest.fixture
def toy_de() -> M.DEComparison:
    # real DE genes g0..g3 (|lfc| 3, 2, 1, 0.5); predicted DE genes g1, g0, g4.
    real = _de([3.0, -2.0, 1.0, -0.5, 0.1, 0.2], [S, S, S, S, N, N])
    pred = _de([4.0, 5.0, 0.3, 0.0, -1.0, 0.2], [S, S, N, N, S, N])
    return M.compare_de(real, pred)


def test_overlap_and_precision_by_hand(toy_de):
    assert M.de_overlap(toy_de, None, "overlap")[0] == pytest.approx(2 / 4)  # N = 4 real DE genes
    assert M.de_overlap(toy_de, None, "precision")[0] == pytest.approx(2 / 3)  # N = 3 predicted
    assert M.de_overlap(toy_de, 50, "overlap")[0] == pytest.approx(2 / 4)  # k capped at 4
    assert M.de_overlap(toy_de, 1, "overlap")[0] == 0.0  # g0 vs g1
    assert M.de_overlap(toy_de, 2, "overlap")[0] == 1.0  # {g0, g1} both sides


def test_overlap_ties_keep_gene_order():
    real = _de([np.inf, 1.0, -np.inf, 2.0], [S, S, S, S])
    pred = _de([0.0, 0.0, 9.0, 0.0], [N, N, S, N])
    cmp = M.compare_de(real, pred)
    assert cmp.real_rank[0].tolist() == [0, 3, 1, 2]  # ±inf tie: g0 before g2
    assert M.de_overlap(cmp, 1, "overlap")[0] == 0.0
    assert M.de_overlap(cmp, 2, "overlap")[0] == 0.5


def test_overlap_is_zero_without_de_genes():
    cmp = M.compare_de(_de([1.0, 2.0], [N, N]), _de([1.0, 2.0], [S, S]))
    assert M.de_overlap(cmp, None, "overlap")[0] == 0.0
    assert M.de_overlap(cmp, None, "precision")[0] == 0.0


def test_direction_recall_and_counts(toy_de):
    # signs on real DE genes: real (+,-,+,-), pred (+,+,+,0) -> g0 and g2 agree
    assert M.de_direction_match(toy_de)[0] == pytest.approx(0.5)
    assert M.de_sig_genes_recall(toy_de)[0] == pytest.approx(0.5)
    assert toy_de.n_real.tolist() == [4] and toy_de.n_pred.tolist() == [3]


def test_spearman_lfc_on_real_de_genes(toy_de):
    expect = spearmanr([3.0, -2.0, 1.0, -0.5], [4.0, 5.0, 0.3, 0.0]).statistic
    assert M.de_spearman_lfc_sig(toy_de)[0] == pytest.approx(expect, abs=1e-12)


def test_spearman_sig_counts_across_perturbations():
    real = _de([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]], [[S, S, S], [S, N, N], [S, S, N], [N, N, N]])
    pred = _de([[1, 1, 1]] * 4, [[S, N, N], [S, S, S], [N, N, N], [S, S, S]])
    cmp = M.compare_de(real, pred)
    # perturbations with real DE genes: counts real (3, 1, 2) vs pred (1, 3, 0)
    assert M.de_spearman_sig(cmp) == pytest.approx(spearmanr([3, 1, 2], [1, 3, 0]).statistic)
    none = M.compare_de(_de([[1.0]], [[N]]), _de([[1.0]], [[S]]))
    assert M.de_spearman_sig(none) == 1.0  # cell-eval: no DE anywhere counts as agreement


def test_auc_matches_sklearn_with_ties(rng):
    n_p, n_g = 5, 300
    real_fdr = np.where(rng.uniform(size=(n_p, n_g)) < 0.2, 0.001, 0.5)
    pred_fdr = np.round(rng.uniform(size=(n_p, n_g)), 2)  # many ties
    pred_fdr[:, :10] = 1e-12  # below the 1e-10 clip: ties at the top
    cmp = M.compare_de(_de(np.zeros((n_p, n_g)), real_fdr), _de(np.zeros((n_p, n_g)), pred_fdr))
    pr, roc = M.pr_auc(cmp), M.roc_auc(cmp)
    for i in range(n_p):
        labels = (real_fdr[i] < 0.05).astype(float)
        score = -np.log10(np.clip(pred_fdr[i].astype(np.float32), np.float32(1e-10), 1.0))
        assert pr[i] == pytest.approx(average_precision_score(labels, score), abs=1e-12)
        assert roc[i] == pytest.approx(roc_auc_score(labels, score), abs=1e-12)
    degenerate = M.compare_de(_de([[0.0, 0.0]], [[S, S]]), _de([[0.0, 0.0]], [[S, N]]))
    assert np.isnan(M.pr_auc(degenerate)[0]) and np.isnan(M.roc_auc(degenerate)[0])


def test_average_ranks_match_scipy(rng):
    x = rng.integers(0, 5, size=(4, 12)).astype(float)
    x[0, 3] = np.inf
    mask = rng.uniform(size=x.shape) < 0.7
    ranks = M.average_ranks(x, mask)
    for i in range(4):
        np.testing.assert_allclose(ranks[i, mask[i]], rankdata(x[i, mask[i]]))
        assert np.isnan(ranks[i, ~mask[i]]).all()


def _pb(real, real_ctrl, pred, pred_ctrl) -> M.Pseudobulk:
    return M.Pseudobulk(
        perts=np.arange(len(real)).astype(str),
        real=np.asarray(real, float),
        real_ctrl=np.asarray(real_ctrl, float),
        pred=np.asarray(pred, float),
        pred_ctrl=np.asarray(pred_ctrl, float),
    )


def test_pearson_delta_uses_the_predicted_control():
    real = [[2.0, 0.0, 1.0]]  # real delta (1, -1, 0)
    pb = _pb(real, [1.0, 1.0, 1.0], [[1.0, 4.0, 3.0]], [0.0, 5.0, 3.0])  # predicted delta (1, -1, 0)
    assert M.pearson_delta(pb)[0] == pytest.approx(1.0)
    # subtracting the *real* control instead would anti-correlate: (0, 3, 2) vs (1, -1, 0)
    assert M.pearson_rows(pb.pred - pb.real_ctrl, pb.real_delta)[0] < 0
    flipped = _pb(real, [1.0, 1.0, 1.0], [[0.0, 2.0, 1.0]], [1.0, 1.0, 1.0])
    assert M.pearson_delta(flipped)[0] == pytest.approx(-1.0)
    no_change = _pb(real, [1.0, 1.0, 1.0], [[0.3, 0.7, 0.1 + 0.2]], [0.3, 0.7, 0.30000000000000004])
    assert np.isnan(M.pearson_delta(no_change)[0])  # rounding-only delta is no delta


def test_mse_mae_by_hand():
    pb = _pb([[0.0, 0.0]], [1.0, 1.0], [[1.0, 2.0]], [0.0, 0.0])
    assert M.mse(pb)[0] == pytest.approx(2.5) and M.mae(pb)[0] == pytest.approx(1.5)
    # deltas: real (-1, -1), pred (1, 2)
    assert M.mse_delta(pb)[0] == pytest.approx((4 + 9) / 2) and M.mae_delta(pb)[0] == pytest.approx(2.5)


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_discrimination_by_hand(metric):
    real = np.eye(3) + 0.05
    assert M.discrimination_score(real, real, metric).tolist() == [1.0, 1.0, 1.0]
    swapped = real[[1, 0, 2]]
    score = M.discrimination_score(real, swapped, metric)
    assert score[2] == 1.0 and score[0] == pytest.approx(2 / 3) and score[1] == pytest.approx(2 / 3)


def test_discrimination_excludes_the_target_gene():
    real = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    pred = np.array([[0.0, 0.1, 0], [0, 5.0, 0], [0, 0, 5.0]])  # A predicted without its knock-down
    targets = M.target_gene_index(np.array(["A", "B", "C"]), np.array(["A", "B", "C"]))
    assert targets.tolist() == [0, 1, 2]
    assert M.discrimination_score(real, pred, "l1", targets)[0] == 1.0
    assert M.discrimination_score(real, pred, "l1", None)[0] < 1.0
    assert M.target_gene_index(np.array(["A+B"]), np.array(["A", "B"])).tolist() == [-1]


def test_energy_distance_matches_direct_computation(rng):
    X = rng.normal(size=(30, 6))
    codes = np.array([0] * 8 + [1] * 10 + [2] * 12)  # 2 = control
    ed = M.energy_distances(sp.csr_matrix(X), codes, X * 1.1, codes, 2)

    def energy(a, b):
        return 2 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean()

    ctrl = X[codes == 2]
    for i in range(2):
        grp = X[codes == i]
        assert ed.real[i] == pytest.approx(energy(grp, ctrl), rel=1e-10)
        assert ed.pred[i] == pytest.approx(energy(grp * 1.1, ctrl * 1.1), rel=1e-10)
        assert ed.pred_real[i] == pytest.approx(energy(grp * 1.1, grp), rel=1e-10)
    assert M.pearson_edistance(ed) == pytest.approx(1.0)


def test_describe_follows_polars_semantics():
    col = pd.arrays.FloatingArray(np.array([1.0, np.nan, 3.0, 0.0, 2.0]), np.array([0, 0, 0, 1, 0], dtype=bool))
    stats = dict(zip(M.AGG_STATISTICS, M.describe(col)))
    assert stats["count"] == 4 and stats["null_count"] == 1
    assert np.isnan(stats["mean"]) and np.isnan(stats["std"])  # NaN propagates
    assert stats["min"] == 1 and stats["max"] == 3  # min/max skip NaN
    assert (stats["25%"], stats["50%"], stats["75%"]) == (2.0, 3.0, 3.0)  # nearest rank, NaN last
    clean = dict(zip(M.AGG_STATISTICS, M.describe(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))))
    assert clean["std"] == pytest.approx(np.std([1, 2, 3, 4, 5, 6], ddof=1))
    assert (clean["25%"], clean["50%"], clean["75%"]) == (2.0, 4.0, 5.0)
    assert M.describe(np.array([7.0]))[3] is None  # std of one value


@pytest.fixture(scope="module")
def small_pair():
    return make_pair(n_perts=6, cells_per_pert=40, n_genes=120, n_control=80, seed=1, effect_fraction=0.1)


def test_compute_metrics_layout(small_pair):
    real, pred = small_pair
    res = M.compute_metrics(
        real.X, real.obs["target"], pred.X, pred.obs["target"], real.var_names.to_numpy(), "control"
    )
    assert list(res.results.columns) == ["perturbation", *M.PROFILES["full"]]
    assert list(res.results.perturbation) == sorted(res.results.perturbation)
    assert list(res.agg.statistic) == list(M.AGG_STATISTICS)
    assert list(res.agg.columns[1:]) == list(M.PROFILES["full"])
    r = res.results
    assert r["pearson_delta"].astype(float).between(0.2, 1.0).all()  # a real, imperfect prediction
    assert (r["de_nsig_counts_real"].astype(float) > 0).all()
    assert len(set(r["pearson_edistance"].astype(float))) == 1  # one value for all rows, as cell-eval
    assert list(res.extras.columns) == ["perturbation", *M.EXTRA_METRICS]


def test_no_real_de_gives_null_not_nan(small_pair):
    real, _ = small_pair
    labels = real.obs["target"].astype(str).to_numpy().copy()
    ctrl_rows = np.flatnonzero(labels == "control")
    labels[ctrl_rows[:20]] = "NOOP"  # a perturbation drawn from the controls: no DE
    res = M.compute_metrics(real.X, labels, real.X, labels, real.var_names.to_numpy(), "control")
    row = res.results.set_index("perturbation").loc["NOOP"]
    for name in ("de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall"):
        assert row[name] is pd.NA
    assert row["overlap_at_N"] == 0.0
    agg = res.agg.set_index("statistic")
    assert agg.loc["null_count", "de_direction_match"] == 1
    # real vs itself: every perturbation with DE genes is recovered exactly
    others = res.results[res.results.perturbation != "NOOP"]
    assert (others["overlap_at_N"].astype(float) == 1.0).all()
    assert (others["discrimination_score_l1"].astype(float) >= 0.8).all()


def test_profiles(small_pair):
    real, pred = small_pair
    args = (real.X, real.obs["target"], pred.X, pred.obs["target"], real.var_names.to_numpy(), "control")
    fast = M.compute_metrics(*args, profile="fast", extras=False)
    assert fast.real_de is None and list(fast.results.columns[1:]) == list(M.PROFILES["fast"])
    minimal = M.compute_metrics(*args, profile="minimal", extras=False)
    assert list(minimal.results.columns[1:]) == list(M.PROFILES["minimal"])
    with pytest.raises(ValueError, match="unknown metric profile"):
        M.compute_metrics(*args, profile="nope")
