"""The additive baseline, raw and on the low-rank prior (the ablation beside SCALE's `model.prior_rank`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bionemo_scale.config import SynthConfig
from bionemo_scale.data.prior import AdditivePrior
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError
from bionemo_scale.eval.baselines import make_baseline
from tests.eval._eval_data import fewshot_screen

SMALL = SynthConfig(
    n_cells=4000, n_genes=80, n_programs=4, n_contexts=3, n_batches=1, n_perturbations=8, chunk_rows=900
)


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProcessedDataset, np.ndarray]:
    return fewshot_screen(tmp_path_factory.mktemp("baselines") / "ds", SMALL)


def _conditions(data: ProcessedDataset, group: int) -> dict[str, torch.Tensor]:
    g = data.index.groups
    return {
        "context_id": torch.tensor([int(g.at[group, "context_id"])]),
        "pert_id": torch.tensor([int(g.at[group, "pert_id"])]),
    }


def test_additive_on_the_low_rank_prior_is_the_projected_shift(screen) -> None:
    data, labels = screen
    group = int(np.flatnonzero(labels == "test")[0])
    ctrl = torch.rand(1, 5, data.n_genes) + 2.0  # far from 0: the clamp does not act
    cond = _conditions(data, group)
    raw = make_baseline("additive", data, labels)(ctrl, cond)
    ranked = make_baseline("additive", data, labels, prior_rank=2)(ctrl, cond)
    prior = AdditivePrior.from_data(data, labels).with_rank(2)
    ctx = data.index.contexts[int(cond["context_id"])]
    pert = data.index.perturbations[int(cond["pert_id"])]
    expected = ctrl + torch.from_numpy(prior.vector(ctx, pert).astype(np.float32))
    torch.testing.assert_close(ranked, expected)
    assert not torch.allclose(raw, ranked)


def test_unknown_method_is_a_clear_error(screen) -> None:
    data, labels = screen
    with pytest.raises(ScaleError, match="unknown baseline method 'median'"):
        make_baseline("median", data, labels)


def test_the_cli_rejects_a_bad_rank(tmp_path: Path) -> None:
    import argparse

    from bionemo_scale.cli import _prior_rank_arg

    assert _prior_rank_arg("auto") == "auto" and _prior_rank_arg("12") == 12
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'auto'"):
            _prior_rank_arg(bad)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_training_reads_the_leave_one_out_switch(screen, tmp_path: Path, leave_one_out: bool) -> None:
    # model.prior_basis_leave_one_out reaches the prior the training sets are drawn with
    from bionemo_scale.config import apply_overrides
    from bionemo_scale.recipes import get_recipe
    from bionemo_scale.train.data import ScaleDataModule

    data, _ = screen
    split = tmp_path / "split.toml"
    split.write_text(f'[fewshot."{data.index.contexts[0]}"]\nval = []\ntest = ["{data.index.perturbations[1]}"]\n')
    cfg = apply_overrides(
        get_recipe("tiny_cpu"),
        [f"data.path={data.path}", f"data.split={split}", "model.prior_rank=3",
         f"model.prior_basis_leave_one_out={str(leave_one_out).lower()}"],
    )  # fmt: skip
    prior = ScaleDataModule(cfg, seq_length=8).prior
    assert prior is not None and prior.rank == 3
    assert (prior.spectrum is not None) == leave_one_out
