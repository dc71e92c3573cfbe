"""The synthetic screen writes what it says, with the structure it claims."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from bionemo_scale.config import PreprocessConfig, SynthConfig
from bionemo_scale.data.preprocess import preprocess
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.data.synth import group_sizes, write_synthetic_dataset, write_synthetic_h5ad

SMALL = SynthConfig(
    n_cells=6000,
    n_genes=120,
    n_programs=6,
    n_contexts=3,
    n_batches=2,
    n_perturbations=6,
    n_combinations=2,
    chunk_rows=700,
    effect_scale=1.5,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    write_synthetic_dataset(out, SMALL, progress=False)
    return out


def test_layout_and_counts(synth: Path) -> None:
    data = ProcessedDataset(synth)
    idx = data.index
    ctrl_n, pert_n = group_sizes(SMALL, len(idx.perturbations))
    assert data.n_genes == SMALL.n_genes
    assert len(idx.contexts) == 3 and len(idx.batches) == 6
    assert len(idx.perturbations) == 1 + 6 + 2
    assert sum(len(p) == 2 for p in idx.pert_parts) == 2
    sizes = (idx.groups["end"] - idx.groups["start"]).to_numpy()
    assert set(sizes[idx.is_control]) == {ctrl_n} and set(sizes[~idx.is_control]) == {pert_n}
    assert data.n_cells == 3 * 2 * (ctrl_n + 8 * pert_n)
    assert (synth / "truth.npz").exists()
    manifest = json.loads((synth / "manifest.json").read_text())
    assert manifest["normalisation"]["applied"] == "normalize_total+log1p"
    X = data.gather(np.arange(0, data.n_cells, 7))
    assert np.isfinite(X).all() and X.min() >= 0
    # log1p(normalize_total(1e4)): expm1 of each row sums to 1e4
    np.testing.assert_allclose(np.expm1(X.astype(np.float64)).sum(1), 1e4, rtol=1e-3)


def test_effects_follow_the_truth(synth: Path) -> None:
    """Observed mean deltas point the way the generative effect says, where the effect is large."""
    data = ProcessedDataset(synth)
    truth = np.load(synth / "truth.npz")
    idx, g = data.index, data.index.groups
    cors = []
    for (c, b), ctrl in idx.control_groups_by_context_batch.items():
        ctrl_mean = data.gather(data.group_rows(int(ctrl[0]))).mean(0)
        for gid in g.index[(g["context_id"] == c) & (g["batch_id"] == b) & ~idx.is_control]:
            p = int(g.at[gid, "pert_id"])
            effect = truth["effects"][c, p] @ truth["W"] * truth["responder_fraction"][p]
            if np.abs(effect).max() < 1.0:
                continue
            delta = data.gather(data.group_rows(int(gid))).mean(0) - ctrl_mean
            cors.append(np.corrcoef(delta, effect)[0, 1])
    assert len(cors) > 10
    assert np.median(cors) > 0.5


def test_h5ad_output_preprocesses_to_the_same_structure(tmp_path: Path) -> None:
    info = write_synthetic_h5ad(tmp_path / "s.h5ad", SMALL, progress=False)
    a = ad.read_h5ad(tmp_path / "s.h5ad")
    assert a.shape == (info["cells"], SMALL.n_genes)
    assert np.allclose(a.X.data, np.round(a.X.data))  # integer counts
    assert a.obs["perturbation"].iloc[0] != "control" or a.obs["context"].nunique() == 3
    preprocess(
        tmp_path / "s.h5ad",
        tmp_path / "pp",
        PreprocessConfig(pert_col="perturbation", control="control", context_col="context", batch_col="batch"),
        progress=False,
    )
    data = ProcessedDataset(tmp_path / "pp")
    assert data.n_cells == info["cells"]
    assert data.manifest["normalisation"]["input"] == "counts"


def test_program_gains_scale_every_perturbation_of_a_context_alike() -> None:
    """The gains are the only difference between gain sd 0 and 0.5, and act per (context, program)."""
    from bionemo_scale.data.synth import make_truth

    plain = make_truth(SMALL.model_copy(update={"program_gain_sd": 0.0}), np.random.default_rng(7))
    gained = make_truth(SMALL.model_copy(update={"program_gain_sd": 0.5}), np.random.default_rng(7))
    for name in ("W", "mu", "substates", "batch", "responder_fraction"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(gained, name))
    nonzero = np.abs(plain.effects) > 1e-12
    ratio = np.where(nonzero, gained.effects / np.where(nonzero, plain.effects, 1.0), np.nan)  # [C, P, K]
    # one gain per (context, program): identical across the perturbations of that context
    spread = np.nanmax(ratio, axis=1) - np.nanmin(ratio, axis=1)
    assert np.nanmax(spread) < 1e-9
    gains = np.nanmean(ratio, axis=1)
    assert np.nanstd(np.log(gains)) > 0.2  # and they do differ between contexts and programs
    assert (gains[~np.isnan(gains)] > 0).all()
