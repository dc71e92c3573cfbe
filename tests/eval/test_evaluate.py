"""`run_evaluate`: files written, context handling, baselines, and one-line errors on bad input."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bionemo_scale.errors import ScaleError
from bionemo_scale.eval import evaluate as evaluate_module
from bionemo_scale.eval import metrics as M
from bionemo_scale.eval._synthetic import make_pair
from bionemo_scale.eval.evaluate import REFERENCES, parse_baselines, run_evaluate, write_csv


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    real, pred = make_pair(n_perts=6, cells_per_pert=30, n_genes=100, n_control=60, seed=3, effect_fraction=0.1)
    d = tmp_path_factory.mktemp("pair")
    real.write_h5ad(d / "real.h5ad")
    pred.write_h5ad(d / "pred.h5ad")
    return d / "real.h5ad", d / "pred.h5ad", real, pred


def _read(path):
    return pd.read_csv(path, float_precision="round_trip")


def test_writes_cell_eval_files_and_report(pair_files, tmp_path):
    real_path, pred_path, real, pred = pair_files
    out = tmp_path / "out"
    res = run_evaluate(pred_path, real_path, "target", "control", out, progress=False)
    for name in ("results.csv", "agg_results.csv", "results_extra.csv", "report.md", "run.json"):
        assert (out / name).is_file(), name
    for fig in ("delta_scatter", "metric_bars", "pca", "de_overlap"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    for ref in REFERENCES:
        assert (out / "baselines" / f"{ref}_results.csv").is_file()

    written = _read(out / "results.csv")
    assert list(written.columns) == ["perturbation", *M.PROFILES["full"]]
    direct = M.compute_metrics(
        real.X, real.obs["target"], pred.X, pred.obs["target"], real.var_names.to_numpy(), "control"
    ).results
    for col in M.PROFILES["full"]:
        np.testing.assert_allclose(
            written[col].to_numpy(float), direct[col].to_numpy(float, na_value=np.nan), rtol=0, atol=0
        )
    agg = _read(out / "agg_results.csv")
    assert agg.statistic.tolist() == list(M.AGG_STATISTICS)
    zeros = _read(out / "baselines" / "all_zeros_results.csv")
    no_change = _read(out / "baselines" / "control_mean_results.csv")
    assert no_change["pearson_delta"].isna().all()  # a zero delta has no correlation
    assert (zeros["mae"] > written["mae"]).all()
    report = (out / "report.md").read_text()
    assert "figures/metric_bars.png" in report and "all_zeros" in report and "control_mean" in report
    assert res.model.results.shape[0] == 6


def test_context_pairs_are_scored_against_their_own_controls(pair_files, tmp_path):
    _, _, real, pred = pair_files
    rng = np.random.default_rng(0)
    ctx = rng.choice(["lineA", "line/B"], size=real.n_obs)
    real, pred = real.copy(), pred.copy()
    real.obs["line"] = ctx
    pred.obs["line"] = ctx
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    out = tmp_path / "out"
    run_evaluate(
        tmp_path / "pred.h5ad", tmp_path / "real.h5ad", "target", "control", out, context_col="line", report=False
    )
    results = _read(out / "results.csv")
    assert list(results.columns[:2]) == ["perturbation", "context"]
    assert len(results) == 12  # 6 perturbations in each of 2 contexts
    assert (out / "lineA_results.csv").is_file() and (out / "line-B_agg_results.csv").is_file()
    sub = ctx == "lineA"
    direct = M.compute_metrics(
        real.X[sub],
        real.obs["target"].to_numpy()[sub],
        pred.X[sub],
        pred.obs["target"].to_numpy()[sub],
        real.var_names.to_numpy(),
        "control",
    ).results
    mine = results[results.context == "lineA"].reset_index(drop=True)
    np.testing.assert_allclose(mine["mse"], direct["mse"].astype(float))
    np.testing.assert_allclose(mine["overlap_at_N"], direct["overlap_at_N"].astype(float))


def test_baseline_is_scored_beside_the_model(pair_files, tmp_path):
    real_path, pred_path, _, _ = pair_files
    out = tmp_path / "out"
    res = run_evaluate(pred_path, real_path, "target", "control", out, baselines={"oracle": real_path}, report=False)
    oracle = _read(out / "baselines" / "oracle_results.csv")
    assert (oracle["overlap_at_N"] == 1.0).all() and (oracle["pearson_delta"] == 1.0).all()
    assert not (out / "baselines" / "all_zeros_results.csv").exists()  # references come with the report
    assert set(res.baselines) == {"oracle"}


def test_write_de_tables(pair_files, tmp_path):
    real_path, pred_path, _, _ = pair_files
    run_evaluate(pred_path, real_path, "target", "control", tmp_path / "o", report=False, write_de=True)
    de = _read(tmp_path / "o" / "real_de.csv")
    assert list(de.columns) == [
        "target",
        "feature",
        "target_mean",
        "ref_mean",
        "target_membership",
        "ref_membership",
        "log2_fold_change",
        "percent_change",
        "p_value",
        "statistic",
        "fdr",
    ]
    assert len(de) == 6 * 100


def test_csv_keeps_null_and_nan_apart(tmp_path):
    col = pd.arrays.FloatingArray(np.array([0.25, np.nan, 0.0]), np.array([False, False, True]))
    write_csv(pd.DataFrame({"perturbation": ["a", "b,c", "d"], "m": col}), tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text().splitlines() == ["perturbation,m", "a,0.25", '"b,c",NaN', "d,"]


def _mutate(real: ad.AnnData, pred: ad.AnnData, case: str) -> tuple[ad.AnnData, ad.AnnData, dict]:
    kwargs: dict = {}
    labels = pred.obs["target"].astype(str).to_numpy()
    if case == "gene_set":
        pred = pred[:, pred.var_names[:-3]].copy()
    elif case == "gene_order":
        pred = pred[:, pred.var_names[::-1]].copy()
    elif case == "missing_pert":
        pred = pred[labels != labels[-1]].copy()
    elif case == "extra_pert":
        pred = pred.copy()
        last = np.flatnonzero(labels == labels[-1])
        labels[last[: last.size // 2]] = "EXTRA"
        pred.obs["target"] = pd.Categorical(labels)
    elif case == "no_control":
        pred = pred[labels != "control"].copy()
    elif case == "nan":
        pred = pred.copy()
        X = pred.X.toarray()
        X[3, 4] = np.nan
        pred.X = sp.csr_matrix(X)
    elif case == "negative":
        pred = pred.copy()
        X = pred.X.toarray()
        X[3, 4] = -0.5
        pred.X = X
    elif case == "pert_col":
        kwargs["pert_col"] = "nope"
    elif case == "context_col":
        kwargs["context_col"] = "cell_line"
    return real, pred, kwargs


BAD_INPUTS = {
    "gene_set": "gene sets differ: real genes missing from the prediction: 3",
    "gene_order": "gene order differs",
    "missing_pert": "in the real data but not in the prediction",
    "extra_pert": "in the prediction but not in the real data",
    "no_control": "no control cells labelled 'control' in the pred data",
    "nan": "NaN or infinite",
    "negative": "negative values",
    "pert_col": "column 'nope' is not in the real obs",
    "context_col": "column 'cell_line' is not in the real obs",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_no_output(pair_files, tmp_path, case):
    _, _, real, pred = pair_files
    real, pred, kwargs = _mutate(real, pred, case)
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    out = tmp_path / "out"
    args = {"pert_col": "target", "control": "control", **kwargs}
    with pytest.raises(ScaleError, match=BAD_INPUTS[case]) as info:
        run_evaluate(tmp_path / "pred.h5ad", tmp_path / "real.h5ad", output_dir=out, report=False, **args)
    message = str(info.value)
    assert "\n" not in message and "Fix:" in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_file_and_existing_output(pair_files, tmp_path):
    real_path, pred_path, _, _ = pair_files
    with pytest.raises(ScaleError, match="does not exist"):
        run_evaluate(tmp_path / "nope.h5ad", real_path, "target", "control", tmp_path / "o1", report=False)
    (tmp_path / "o2").mkdir()
    with pytest.raises(ScaleError, match="already exists"):
        run_evaluate(pred_path, real_path, "target", "control", tmp_path / "o2", report=False)
    run_evaluate(pred_path, real_path, "target", "control", tmp_path / "o2", report=False, overwrite=True)
    assert (tmp_path / "o2" / "results.csv").is_file()


def test_progress_bar_reaches_its_total(pair_files, tmp_path, monkeypatch):
    real_path, pred_path, _, _ = pair_files
    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(evaluate_module, "tqdm", Recorder)
    run_evaluate(pred_path, real_path, "target", "control", tmp_path / "o", report=False, references=True)
    assert len(bars) == 1 and bars[0].total > 6 and bars[0].n == bars[0].total


def test_parse_baselines():
    assert parse_baselines(["additive=a.h5ad", " mean = b.h5ad"]) == {
        "additive": Path("a.h5ad"),
        "mean": Path("b.h5ad"),
    }
    with pytest.raises(ScaleError, match="NAME=PATH"):
        parse_baselines(["additive"])
    with pytest.raises(ScaleError, match="twice"):
        parse_baselines(["a=x", "a=y"])


def test_threads_are_scoped(pair_files, tmp_path):
    import torch

    real_path, pred_path, _, _ = pair_files
    before = torch.get_num_threads()
    run_evaluate(pred_path, real_path, "target", "control", tmp_path / "o", report=False, threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ScaleError, match="threads must be at least 1"):
        run_evaluate(pred_path, real_path, "target", "control", tmp_path / "o2", report=False, threads=0)
    assert not (tmp_path / "o2").exists()


def test_duplicate_predicted_genes_are_named_as_such() -> None:
    """A duplicated gene in PRED used to be reported as a real gene missing from the prediction."""
    import anndata as ad
    import numpy as np
    import pytest

    from bionemo_scale.errors import ScaleError
    from bionemo_scale.eval._anndata import check_genes

    real = ad.AnnData(X=np.zeros((2, 3), dtype=np.float32))
    real.var_names = ["a", "b", "c"]
    pred = real.copy()
    pred.var_names = ["a", "b", "b"]
    with pytest.raises(ScaleError, match=r"prediction gene names are not unique \('b'\)"):
        check_genes(real, pred)
    # a baseline's genes are blamed on the baseline, not on the prediction
    pred.var_names = ["c", "b", "a"]
    with pytest.raises(ScaleError, match=r"position 0 is 'a' in real but 'c' in the baseline x"):
        check_genes(real, pred, "baseline x")


def test_report_of_a_one_gene_panel(tmp_path):
    """The PCA panel used to index a second component that one gene does not have."""
    real, pred = make_pair(n_perts=2, cells_per_pert=20, n_genes=20, n_control=30, seed=1, effect_fraction=1.0)
    real[:, :1].copy().write_h5ad(tmp_path / "real.h5ad")
    pred[:, :1].copy().write_h5ad(tmp_path / "pred.h5ad")
    out = tmp_path / "out"
    run_evaluate(tmp_path / "pred.h5ad", tmp_path / "real.h5ad", "target", "control", out, progress=False)
    assert (out / "report.md").exists() and any(out.rglob("pca.png"))
