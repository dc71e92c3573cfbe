"""Population-centred prediction: each predicted group's control cells moved onto their pool's mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bionemo_scale.config import SamplerConfig, SynthConfig
from bionemo_scale.data.control_means import GroupControlMeans, center_sets, group_targets
from bionemo_scale.data.sampler import SetPairDataset
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.eval.baselines import make_baseline
from bionemo_scale.predict import plan_predictions, run_predictor
from tests.eval._eval_data import fewshot_screen

SMALL = SynthConfig(
    n_cells=3000, n_genes=60, n_programs=4, n_contexts=2, n_batches=2, n_perturbations=6, chunk_rows=700
)


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProcessedDataset, np.ndarray]:
    return fewshot_screen(tmp_path_factory.mktemp("centring") / "ds", SMALL)


def _pool_rows(data: ProcessedDataset, group: int, matching: str) -> np.ndarray:
    pools = SetPairDataset(data, np.array([group]), SamplerConfig(set_size=1, control_matching=matching), 1)
    pool = pools.control_pool(group)
    return pool.rows(np.arange(pool.size))


@pytest.mark.parametrize("matching", ["batch", "random"])
def test_pool_means_are_the_means_of_the_pools_the_sampler_draws(screen, matching: str) -> None:
    data, _ = screen
    means = GroupControlMeans(data, matching)
    perturbed = np.flatnonzero(~data.index.is_control)
    for g in perturbed:
        expected = data.gather(_pool_rows(data, int(g), matching)).astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(means(int(g)), expected, rtol=1e-5, atol=1e-6)
    # each pool is read once and shared by its groups: (context, batch) pools, or one per context
    n_pools = len(data.index.contexts) * (SMALL.n_batches if matching == "batch" else 1)
    assert len(means._by_pool) == n_pools


def test_group_targets_centre_a_padded_group_as_one_sample() -> None:
    g = torch.Generator().manual_seed(0)
    n, s, genes = 23, 10, 7  # three sets, the last holding 3 real cells and 7 repeats
    ctrl = torch.rand(3, s, genes, generator=g) * 4
    pool = torch.rand(genes, generator=g)
    base = center_sets(ctrl, group_targets(ctrl, n, pool.expand(3, -1)))
    torch.testing.assert_close(base.reshape(-1, genes)[:n].mean(dim=0), pool)
    # every cell moves by one vector, so differences between cells are kept
    moved = base.reshape(-1, genes)[:n] - ctrl.reshape(-1, genes)[:n]
    torch.testing.assert_close(moved, moved[:1].expand(n, -1))


def test_a_centred_prediction_has_the_pool_mean(screen) -> None:
    """Through `run_predictor` (sets of 16, the last padded): where no predicted value of a group
    was clamped at 0, the mean of its cells is its pool's mean exactly; without centring it is
    the sampled cells' mean, which differs."""
    data, labels = screen
    groups = np.flatnonzero((labels == "test") & ~data.index.is_control)
    plans = plan_predictions(data, groups, seed=3)
    means = GroupControlMeans(data)
    control = make_baseline("control", data, labels, center=True)
    pred = run_predictor(data, plans, control, 16, 3, progress=False, control_means=means)
    plain = run_predictor(data, plans, make_baseline("control", data, labels), 16, 3, progress=False)
    start, checked = 0, 0
    for plan in plans:
        n = plan.ctrl_rows.size
        cells, sampled = pred[start : start + n], plain[start : start + n]
        start += n
        np.testing.assert_array_equal(sampled, data.gather(plan.ctrl_rows))
        unclamped = (cells > 0).all(axis=0)
        np.testing.assert_allclose(cells[:, unclamped].mean(axis=0), means(plan.group)[unclamped], atol=1e-5)
        assert not np.allclose(sampled[:, unclamped].mean(axis=0), means(plan.group)[unclamped], atol=1e-3)
        checked += int(unclamped.sum())
    assert checked > 20


def test_training_batches_carry_their_pool_means(screen, tmp_path) -> None:
    """`model.center_controls`: every training set pair gets the mean of the pool its control set
    was drawn from (`ScaleLightningModule.data_step`, what the model centres on)."""
    from types import SimpleNamespace

    from torch.utils.data import default_collate

    from bionemo_scale.config import apply_overrides
    from bionemo_scale.recipes import get_recipe
    from bionemo_scale.train.data import ScaleDataModule
    from bionemo_scale.train.module import ScaleLightningModule

    data, _ = screen
    split = tmp_path / "split.toml"
    split.write_text(f'[fewshot."{data.index.contexts[0]}"]\nval = []\ntest = ["{data.index.perturbations[1]}"]\n')
    cfg = apply_overrides(
        get_recipe("tiny_cpu"), [f"data.path={data.path}", f"data.split={split}", "model.center_controls=true"]
    )
    dm = ScaleDataModule(cfg, seq_length=8)
    assert isinstance(dm.control_means, GroupControlMeans)
    dm.setup()
    items = [dm._train_ds[k] for k in range(4)]
    module = ScaleLightningModule(cfg)
    module._trainer = SimpleNamespace(datamodule=dm, training=True)
    batch = module.data_step(iter([default_collate(items)]))
    pools = SetPairDataset(data, dm.train_groups, cfg.data.sampler, 1)
    for row, g in enumerate(batch["group_id"].tolist()):
        rows = _pool_rows(data, g, cfg.data.sampler.control_matching)
        assert pools.control_pool(g).size == rows.size
        expected = data.gather(rows).astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(batch["control_mean"][row].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_composed_combinations_count_the_centring_once() -> None:
    """`flow.combinations=compose` with centring: A+B = centred cells + (Â − centred) + (B̂ − centred)."""
    from bionemo_scale.predict import compose_shifts

    g = torch.Generator().manual_seed(1)
    ctrl = torch.rand(2, 5, 4, generator=g) + 2.0
    target = torch.rand(2, 4, generator=g) + 2.0
    base = center_sets(ctrl, target)
    a, b = torch.rand(4, generator=g), -torch.rand(4, generator=g)
    composed = compose_shifts(ctrl, [base + a, base + b], target)
    torch.testing.assert_close(composed, (base + a + b).clamp_min(0.0))
    # taken from the uncentred cells, each single's shift would carry the centring once more
    assert not torch.allclose(compose_shifts(ctrl, [base + a, base + b]), composed, atol=1e-3)
