"""The set-pair sampler: control matching, determinism, DP sharding, resume, one gather."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bionemo_scale.config import PreprocessConfig, SamplerConfig
from bionemo_scale.data.preprocess import preprocess
from bionemo_scale.data.sampler import SetPairDataset, ShardedSetSampler
from bionemo_scale.data.store import ProcessedDataset
from bionemo_scale.errors import ScaleError
from tests.data.conftest import make_counts_adata

CFG = dict(pert_col="gene", control="ctrl", context_col="cell_line", batch_col="plate", dose_col="dose")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> ProcessedDataset:
    tmp = tmp_path_factory.mktemp("sampler")
    a = make_counts_adata(n_per_group=10)
    # batch b2 of ctxB has no controls: its perturbed groups must fall back to ctxB's controls
    drop = (a.obs["cell_line"] == "ctxB") & (a.obs["plate"] == "b2") & (a.obs["gene"] == "ctrl")
    a = a[~drop.to_numpy()].copy()
    a.write_h5ad(tmp / "in.h5ad")
    preprocess(tmp / "in.h5ad", tmp / "out", PreprocessConfig(**CFG), progress=False)
    return ProcessedDataset(tmp / "out")


def _pert_groups(data: ProcessedDataset) -> np.ndarray:
    return np.flatnonzero(~data.index.is_control)


def _row_labels(data: ProcessedDataset, rows: np.ndarray) -> list[tuple[str, str, str]]:
    obs = data.obs.iloc[rows]
    return list(zip(obs["cell_line"], obs["plate"], obs["gene"]))


def test_items_have_the_documented_shapes(data: ProcessedDataset) -> None:
    ds = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=16))
    item = ds[3]
    assert item["ctrl"].shape == item["pert"].shape == (16, data.n_genes)
    assert item["ctrl"].dtype == item["pert"].dtype == torch.float32
    for key in ("pert_id", "context_id", "batch_id", "dose"):
        assert item[key].shape == ()
    np.testing.assert_array_equal(item["pert"].numpy(), data.gather(item["pert_rows"].numpy()))
    np.testing.assert_array_equal(item["ctrl"].numpy(), data.gather(item["ctrl_rows"].numpy()))


@pytest.mark.parametrize("matching", ["batch", "random"])
def test_controls_come_from_the_right_context_and_batch(data: ProcessedDataset, matching: str) -> None:
    ds = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=8, control_matching=matching))
    idx = data.index
    fallback = set(ds.fallback_groups())
    for k in range(ds.epoch_length):
        g, ctrl_rows, pert_rows = ds.pair_rows(k)
        ctx = idx.contexts[idx.groups.at[g, "context_id"]]
        batch = idx.batches[idx.groups.at[g, "batch_id"]]
        pert = idx.perturbations[idx.groups.at[g, "pert_id"]]
        assert set(_row_labels(data, pert_rows)) == {(ctx, batch, pert)}
        ctrl = _row_labels(data, ctrl_rows)
        assert {c for c, _, _ in ctrl} == {ctx} and {p for _, _, p in ctrl} == {"ctrl"}
        if matching == "batch" and g not in fallback:
            assert {b for _, b, _ in ctrl} == {batch}
    if matching == "batch":
        fb = {
            (idx.contexts[idx.groups.at[g, "context_id"]], idx.batches[idx.groups.at[g, "batch_id"]]) for g in fallback
        }
        assert fb == {("ctxB", "b2")}


def test_random_matching_mixes_batches(data: ProcessedDataset) -> None:
    ds = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=10, control_matching="random"))
    g = next(g for g in _pert_groups(data) if data.index.contexts[data.index.groups.at[g, "context_id"]] == "ctxA")
    k = next(k for k in range(ds.epoch_length) if ds.pair_rows(k)[0] == g)
    batches = {b for _, b, _ in _row_labels(data, ds.pair_rows(k)[1])}
    assert batches == {"b1", "b2"}


def test_small_groups_are_sampled_with_replacement(data: ProcessedDataset) -> None:
    ds = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=25))
    _, _ctrl_rows, pert_rows = ds.pair_rows(0)
    assert len(pert_rows) == 25 and len(set(pert_rows.tolist())) <= 10
    ds_small = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=4))
    _, _, rows = ds_small.pair_rows(0)
    assert len(set(rows.tolist())) == 4  # without replacement when the group is large enough


def test_deterministic_given_seed_epoch_index(data: ProcessedDataset) -> None:
    a = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=8, seed=7))
    b = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=8, seed=7))
    c = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=8, seed=8))
    for k in (0, 5, a.epoch_length + 3, 7 * a.epoch_length + 1):
        ga, ca, pa = a.pair_rows(k)
        gb, cb, pb = b.pair_rows(k)
        assert ga == gb and (ca == cb).all() and (pa == pb).all()
    differ = [not np.array_equal(a.pair_rows(k)[2], c.pair_rows(k)[2]) for k in range(10)]
    assert any(differ)
    # epochs reshuffle the group order
    e0 = [a.pair_rows(k)[0] for k in range(a.epoch_length)]
    e1 = [a.pair_rows(a.epoch_length + k)[0] for k in range(a.epoch_length)]
    assert sorted(e0) == sorted(e1) and e0 != e1


@pytest.mark.parametrize("world,mbs", [(2, 1), (2, 3), (4, 2)])
def test_dp_shards_are_disjoint_and_cover_every_group(data: ProcessedDataset, world: int, mbs: int) -> None:
    ds = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=8, epoch_mode="groups"), num_epochs=2)
    shards = [list(ShardedSetSampler(ds.epoch_length, r, world, mbs)) for r in range(world)]
    flat = [k for s in shards for k in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert len({len(s) for s in shards}) == 1  # balanced
    step = world * mbs
    full = ds.epoch_length - ds.epoch_length % step
    assert sorted(flat) == list(range(full))
    if full == ds.epoch_length:
        assert {ds.pair_rows(k)[0] for k in flat} == set(_pert_groups(data).tolist())


def test_the_shards_follow_megatrons_blocked_layout() -> None:
    # each global step takes mbs * world consecutive indices, and rank r gets the r-th block of
    # mbs (not every world-th index): what megatron's pretraining sampler hands each rank
    world, mbs = 3, 2
    shards = [list(ShardedSetSampler(20, r, world, mbs)) for r in range(world)]
    assert shards == [[0, 1, 6, 7, 12, 13], [2, 3, 8, 9, 14, 15], [4, 5, 10, 11, 16, 17]]


def test_resume_from_consumed_samples_continues_the_sequence(data: ProcessedDataset) -> None:
    ds = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=8))
    world, mbs = 2, 2
    full = [list(ShardedSetSampler(len(ds), r, world, mbs)) for r in range(world)]
    consumed = 12
    resumed = [list(ShardedSetSampler(len(ds), r, world, mbs, consumed_samples=consumed)) for r in range(world)]
    for r in range(world):
        assert resumed[r] == full[r][consumed // world :]
    loader = torch.utils.data.DataLoader(
        ds, batch_size=mbs, sampler=ShardedSetSampler(len(ds), 0, world, mbs, consumed)
    )
    first = next(iter(loader))
    np.testing.assert_array_equal(first["pert_rows"][0].numpy(), ds.pair_rows(resumed[0][0])[2])
    with pytest.raises(ScaleError, match="not a multiple"):
        ShardedSetSampler(len(ds), 0, world, mbs, consumed_samples=3)


def test_batch_is_one_gather(data: ProcessedDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = SetPairDataset(data, _pert_groups(data), SamplerConfig(set_size=8))
    calls = []
    original = data.gather

    def counting(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return original(rows)

    monkeypatch.setattr(data, "gather", counting)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=ShardedSetSampler(len(ds), 0, 1, 4))
    batch = next(iter(loader))
    assert calls == [2 * 4 * 8]
    assert batch["ctrl"].shape == (4, 8, data.n_genes)


def test_set_size_must_be_positive(data: ProcessedDataset) -> None:
    with pytest.raises(ValueError, match="set size"):
        SamplerConfig(set_size=0)
    with pytest.raises(ScaleError, match="set size"):
        SetPairDataset(data, _pert_groups(data), SamplerConfig.model_construct(set_size=0, seed=0))


def test_gather_matches_dense_rows(data: ProcessedDataset) -> None:
    rows = np.array([5, 0, 5, data.n_cells - 1, 17])
    dense = data.gather(np.arange(data.n_cells))
    np.testing.assert_array_equal(data.gather(rows), dense[rows])
    np.testing.assert_array_equal(data.arrays.gather_csr(rows).toarray(), dense[rows])
