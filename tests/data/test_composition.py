"""Predicting a combination by composing its singles (`flow.combinations = "compose"`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bionemo_scale.config import PreprocessConfig
from bionemo_scale.data.preprocess import preprocess
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.predict import compose_shifts, composition_groups, plan_predictions, run_predictor

CFG = {"pert_col": "gene", "control": "ctrl", "context_col": "cell_line", "batch_col": "plate", "dose_col": "dose"}


def _groups(data: ProcessedDataset) -> dict[tuple[str, str, str], int]:
    idx, g = data.index, data.index.groups
    return {
        (idx.contexts[c], idx.batches[b], idx.perturbations[p]): i
        for i, (c, b, p) in enumerate(zip(g["context_id"], g["batch_id"], g["pert_id"], strict=True))
    }


def test_composition_groups_are_the_singles_of_the_same_context_and_batch(counts_h5ad: Path, tmp_path: Path) -> None:
    preprocess(counts_h5ad, tmp_path / "d", PreprocessConfig(**CFG), progress=False)
    data = ProcessedDataset(tmp_path / "d")
    ids = _groups(data)
    combo = ids[("ctxB", "b2", "KO1+KO2")]
    assert composition_groups(data, combo) == [ids[("ctxB", "b2", "KO1")], ids[("ctxB", "b2", "KO2")]]
    assert composition_groups(data, ids[("ctxA", "b1", "KO1")]) == []  # a single is not composed


def test_compose_runs_the_predictor_once_per_single_and_sums_shifts(counts_h5ad: Path, tmp_path: Path) -> None:
    preprocess(counts_h5ad, tmp_path / "d", PreprocessConfig(**CFG), progress=False)
    data = ProcessedDataset(tmp_path / "d")
    ids = _groups(data)
    shift_of = {p: float(i + 1) for i, p in enumerate(data.index.perturbations)}  # KO1 -> 2, KO2 -> 3, KO1+KO2 -> 4
    calls: list[int] = []

    def predictor(ctrl: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        pert = int(cond["pert_id"][0])
        calls.append(pert)
        return ctrl + shift_of[data.index.perturbations[pert]]

    plans = plan_predictions(data, np.array([ids[("ctxA", "b1", "KO1+KO2")]]), seed=0)
    ctrl = data.gather(plans[0].ctrl_rows)
    direct = run_predictor(data, plans, predictor, set_size=8, seed=0, progress=False)
    composed = run_predictor(data, plans, predictor, set_size=8, seed=0, progress=False, compose=True)
    combo_shift = shift_of["KO1+KO2"]
    np.testing.assert_allclose(direct, ctrl + combo_shift, rtol=1e-6)
    np.testing.assert_allclose(composed, ctrl + shift_of["KO1"] + shift_of["KO2"], rtol=1e-6)
    perts = data.index.perturbations
    assert sorted({perts[c] for c in calls}) == ["KO1", "KO1+KO2", "KO2"]


def test_compose_shifts_clamps_log_expression_at_zero() -> None:
    ctrl = torch.tensor([[[1.0, 0.5]]])
    out = compose_shifts(ctrl, [ctrl - 0.8, ctrl + 0.1])
    torch.testing.assert_close(out, torch.tensor([[[0.3, 0.0]]]))


def test_compose_sums_unclamped_shifts_when_the_predictor_offers_them(counts_h5ad: Path, tmp_path: Path) -> None:
    """Clamping each single at 0 before the sum would bias zero counts upward; clamp once, after."""
    preprocess(counts_h5ad, tmp_path / "d", PreprocessConfig(**CFG), progress=False)
    data = ProcessedDataset(tmp_path / "d")
    ids = _groups(data)
    ko1 = data.index.perturbations.index("KO1")

    def raw(ctrl: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return ctrl - 100.0 if int(cond["pert_id"][0]) == ko1 else ctrl + 100.0  # KO1 down, KO2 up

    def predictor(ctrl: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return raw(ctrl, cond).clamp_min(0.0)

    plans = plan_predictions(data, np.array([ids[("ctxA", "b1", "KO1+KO2")]]), seed=0)
    ctrl = data.gather(plans[0].ctrl_rows)
    clamped_each = run_predictor(data, plans, predictor, set_size=8, seed=0, progress=False, compose=True)
    np.testing.assert_allclose(clamped_each, 100.0, rtol=1e-6)  # -ctrl + 100: biased
    predictor.unclamped = raw  # type: ignore[attr-defined]
    once = run_predictor(data, plans, predictor, set_size=8, seed=0, progress=False, compose=True)
    np.testing.assert_allclose(once, ctrl, rtol=1e-6, atol=1e-5)  # -100 + 100 cancel


def test_real_file_of_other_predictions_is_not_replaced(tmp_path) -> None:
    """Methods predicted for one split share REAL.h5ad; another split's is not silently replaced."""
    import anndata as ad
    import pandas as pd
    import pytest

    from bionemo_scale.errors import ScaleError
    from bionemo_scale.predict import write_predictions

    def cells(rows: list[int], genes: int = 3) -> ad.AnnData:
        obs = pd.DataFrame({"source_row": rows}, index=[f"c{r}" for r in rows])
        var = pd.DataFrame(index=[f"g{j}" for j in range(genes)])
        return ad.AnnData(X=np.ones((len(rows), genes), dtype=np.float32), obs=obs, var=var)

    real = write_predictions(cells([0, 1]), cells([0, 1]), tmp_path / "scale.h5ad", overwrite=False)
    write_predictions(cells([0, 1]), cells([0, 1]), tmp_path / "additive.h5ad", overwrite=False)  # same cells: fine
    with pytest.raises(ScaleError, match="real cells of other predictions"):
        write_predictions(cells([5, 6, 7]), cells([5, 6, 7]), tmp_path / "other.h5ad", overwrite=False)
    assert ad.read_h5ad(real).n_obs == 2 and not (tmp_path / "other.h5ad").exists()
    write_predictions(cells([5, 6, 7]), cells([5, 6, 7]), tmp_path / "other.h5ad", overwrite=True)
    assert ad.read_h5ad(real).n_obs == 3
