"""preprocess: h5ad -> SCDL round trip, sorting, index, normalisation and HVG selection."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

from bionemo_scale.config import PreprocessConfig
from bionemo_scale.data.normalize import GeneMoments, select_top_genes, seurat_dispersion_norm
from bionemo_scale.data.preprocess import preprocess
from bionemo_scale.data.store import ProcessedDataset

CFG = dict(pert_col="gene", control="ctrl", context_col="cell_line", batch_col="plate", dose_col="dose")


def _expected_log(path: Path, kind: str) -> tuple[np.ndarray, ad.AnnData]:
    a = ad.read_h5ad(path)
    X = a.X.toarray().astype(np.float64)
    if kind == "counts":
        X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    return X.astype(np.float32), a


@pytest.mark.parametrize("fixture,kind", [("counts_h5ad", "counts"), ("log_h5ad", "log1p")])
def test_round_trip_every_row(fixture: str, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = request.getfixturevalue(fixture)
    report = preprocess(src, tmp_path / "out", PreprocessConfig(**CFG, chunk_rows=7), progress=False)
    assert report["normalisation"]["input"] == kind
    expected, a = _expected_log(src, kind)
    data = ProcessedDataset(tmp_path / "out")
    order = data.obs["source_row"].to_numpy()
    assert sorted(order) == list(range(a.n_obs))
    got = data.gather(np.arange(data.n_cells))
    np.testing.assert_allclose(got, expected[order], rtol=1e-6, atol=1e-6)
    # SCDL itself reads the same rows back (the directory is a genuine SCDL dataset).
    scdl = SingleCellMemMapDataset(str(tmp_path / "out" / "scdl"))
    assert scdl.number_of_rows() == a.n_obs
    for r in (0, 17, a.n_obs - 1):
        (vals, cols), _, _ = scdl.get_row(r)
        dense = np.zeros(data.n_genes, np.float32)
        dense[cols] = vals
        np.testing.assert_allclose(dense, expected[order[r]], rtol=1e-6, atol=1e-6)
    assert data.obs["cell_id"].tolist() == list(a.obs_names[order])


def test_groups_are_contiguous_sorted_and_labelled(counts_h5ad: Path, tmp_path: Path) -> None:
    preprocess(counts_h5ad, tmp_path / "out", PreprocessConfig(**CFG), progress=False)
    data = ProcessedDataset(tmp_path / "out")
    idx, obs, g = data.index, data.obs, data.index.groups
    assert idx.perturbations[0] == "ctrl"
    assert g["start"].iloc[0] == 0 and g["end"].iloc[-1] == data.n_cells
    assert (g["start"].to_numpy()[1:] == g["end"].to_numpy()[:-1]).all()
    keys = list(zip(g["context_id"], g["batch_id"], g["pert_id"], g["dose"]))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for _, row in g.iterrows():
        cells = obs.iloc[int(row.start) : int(row.end)]
        assert set(cells["cell_line"]) == {idx.contexts[int(row.context_id)]}
        assert set(cells["plate"]) == {idx.batches[int(row.batch_id)]}
        assert set(cells["gene"]) == {idx.perturbations[int(row.pert_id)]}
    assert len(g) == 2 * 2 * 4
    # combinations are parsed into parts, and parts are kept
    combo = idx.perturbations.index("KO1+KO2")
    assert sorted(idx.parts[p] for p in idx.pert_parts[combo]) == ["KO1", "KO2"]
    assert idx.pert_parts[0] == []
    assert g.loc[g["pert_id"] == combo, "dose"].eq(1.0).all()
    # control pools: one range per (context, batch), matching the control rows
    pools = idx.control_pools()
    for ctx, by_batch in pools.items():
        for batch, ranges in by_batch.items():
            (lo, hi), *_ = ranges
            assert set(obs["gene"].iloc[lo:hi]) == {"ctrl"}
            assert set(obs["cell_line"].iloc[lo:hi]) == {ctx} and set(obs["plate"].iloc[lo:hi]) == {batch}


def test_chunk_size_does_not_change_the_output(counts_h5ad: Path, tmp_path: Path) -> None:
    """Streaming: the output is identical whether the file is read in 5-row or 10k-row chunks."""
    preprocess(counts_h5ad, tmp_path / "a", PreprocessConfig(**CFG, chunk_rows=5, hvg=15), progress=False)
    preprocess(counts_h5ad, tmp_path / "b", PreprocessConfig(**CFG, chunk_rows=10_000, hvg=15), progress=False)
    a, b = ProcessedDataset(tmp_path / "a"), ProcessedDataset(tmp_path / "b")
    assert a.genes == b.genes
    for name in ("data.npy", "col_ptr.npy", "row_ptr.npy"):
        assert (tmp_path / "a/scdl" / name).read_bytes() == (tmp_path / "b/scdl" / name).read_bytes()


def test_hvg_matches_scanpy_seurat(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n, g = 400, 300
    means = rng.gamma(0.8, 2.0, size=g)
    X = rng.poisson(rng.gamma(2.0, means / 2.0, size=(n, g))).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(X))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    expected = sc.pp.highly_variable_genes(a, n_top_genes=60, flavor="seurat", inplace=False)
    moments = GeneMoments(g)
    for lo in range(0, n, 64):  # streamed in chunks
        moments.update(sp.csr_matrix(a.X[lo : lo + 64]))
    mean, var = moments.mean_var()
    ours = seurat_dispersion_norm(mean, var)
    np.testing.assert_allclose(ours, expected["dispersions_norm"].to_numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    chosen = select_top_genes(ours, 60)
    assert set(chosen) == set(np.flatnonzero(expected["highly_variable"].to_numpy()))


def test_hvg_uses_training_cells_only(counts_h5ad: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.toml"
    split.write_text('[zeroshot]\n"ctxB" = "test"\n')
    report = preprocess(
        counts_h5ad, tmp_path / "out", PreprocessConfig(**CFG, hvg=10, split=str(split)), progress=False
    )
    assert "training cells of split split.toml" in report["genes"]["selection"]
    assert report["genes"]["kept"] == 10
    a = ad.read_h5ad(counts_h5ad)
    train = a[a.obs["cell_line"] == "ctxA"].copy()
    sc.pp.normalize_total(train, target_sum=1e4)
    sc.pp.log1p(train)
    hv = sc.pp.highly_variable_genes(train, n_top_genes=10, flavor="seurat", inplace=False)
    assert ProcessedDataset(tmp_path / "out").genes == list(a.var_names[hv["highly_variable"].to_numpy()])


def test_manifest_records_normalisation(counts_h5ad: Path, log_h5ad: Path, tmp_path: Path) -> None:
    preprocess(counts_h5ad, tmp_path / "c", PreprocessConfig(**CFG), progress=False)
    preprocess(log_h5ad, tmp_path / "l", PreprocessConfig(**CFG), progress=False)
    mc = json.loads((tmp_path / "c/manifest.json").read_text())
    ml = json.loads((tmp_path / "l/manifest.json").read_text())
    assert mc["normalisation"]["applied"] == "normalize_total+log1p" and mc["normalisation"]["target_sum"] == 1e4
    assert ml["normalisation"]["applied"].startswith("none")


def test_split_col_is_part_of_the_group_key(tmp_path: Path) -> None:
    from tests.data.conftest import make_counts_adata

    a = make_counts_adata()
    a.obs["split"] = np.where(np.arange(a.n_obs) % 3 == 0, "val", "train")
    a.obs.loc[a.obs["gene"] == "ctrl", "split"] = "train"
    a.write_h5ad(tmp_path / "s.h5ad")
    preprocess(tmp_path / "s.h5ad", tmp_path / "out", PreprocessConfig(**CFG, split_col="split"), progress=False)
    data = ProcessedDataset(tmp_path / "out")
    assert data.index.split_from_data
    labels = data.split_labels("split-col")
    for gid in np.flatnonzero(labels == "val"):
        assert set(data.obs["split"].iloc[data.group_rows(gid)]) == {"val"}
    assert (labels == "val").sum() > 0 and (labels == "train").sum() > 0


def test_combinations_written_in_another_order_are_one_perturbation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 'KO2+KO1' in one batch and 'KO1+KO2' in another are the same combination: left as two labels,
    # holding out 'KO1+KO2' would leave 'KO2+KO1' in training.
    from bionemo_scale.data.preprocess import reordered_combinations
    from tests.data.conftest import make_counts_adata

    a = make_counts_adata()
    flip = ((a.obs["gene"] == "KO1+KO2") & (a.obs["plate"] == "b2")).to_numpy()
    a.obs["gene"] = a.obs["gene"].astype(str).where(~flip, "KO2+KO1")
    a.write_h5ad(tmp_path / "flip.h5ad")
    with caplog.at_level("WARNING"):
        preprocess(tmp_path / "flip.h5ad", tmp_path / "out", PreprocessConfig(**CFG), progress=False)
    assert "merged 1 combination label(s)" in caplog.text and "'KO2+KO1' -> 'KO1+KO2'" in caplog.text
    data = ProcessedDataset(tmp_path / "out")
    assert data.index.perturbations == ["ctrl", "KO1", "KO1+KO2", "KO2"]
    combo = data.index.perturbations.index("KO1+KO2")
    assert int((data.index.groups["pert_id"] == combo).sum()) == 4  # 2 contexts x 2 batches
    # parts are a multiset: a double dose of one part is not that part alone
    assert reordered_combinations({"ctrl", "A", "A+A", "B+A", "A+B"}, "ctrl", "+") == {"B+A": "A+B"}


def test_predictions_keep_each_dose_apart(tmp_path: Path) -> None:
    # A drug at two doses is two conditions: PRED/REAL.h5ad carry `dose` and `condition`
    # ("KO1@0.5"), so `evaluate --pert-col condition` does not pool the doses.
    import anndata as ad

    from bionemo_scale.cli import main
    from tests.data.conftest import make_counts_adata

    a = make_counts_adata()
    half = ((a.obs["gene"] == "KO1") & (a.obs["plate"] == "b2")).to_numpy()
    a.obs["dose"] = a.obs["dose"].astype(str).where(~half, "0.5")
    a.write_h5ad(tmp_path / "doses.h5ad")
    split = tmp_path / "split.toml"
    split.write_text('[fewshot."ctxA"]\nval = []\ntest = ["KO1"]\n')
    out = tmp_path / "out"
    preprocess(tmp_path / "doses.h5ad", out, PreprocessConfig(**CFG), progress=False)
    pred_path = tmp_path / "pred" / "PRED.h5ad"
    rc = main(
        [
            "-q",
            "baseline",
            "--method",
            "additive",
            "--data",
            str(out),
            "--split",
            str(split),
            "--output",
            str(pred_path),
        ]
    )
    assert rc == 0
    for path in (pred_path, pred_path.with_name("REAL.h5ad")):
        obs = ad.read_h5ad(path).obs
        held = obs[obs["perturbation"] == "KO1"]
        assert set(held["condition"]) == {"KO1@0.5", "KO1@1"}
        assert sorted(set(held["dose"])) == [0.5, 1.0]
        assert set(obs.loc[obs["perturbation"] == "ctrl", "condition"]) == {"ctrl"}
