"""The additive prior: leave-context-out shifts, in-context composition of combinations, and the
parts a composed prior already covers (which the model must not count a second time)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from bionemo_scale.data.prior import AdditivePrior, GroupPriors

G = 6


def _vec(*values: float) -> np.ndarray:
    out = np.zeros(G)
    out[: len(values)] = values
    return out


@pytest.fixture
def prior() -> AdditivePrior:
    # K562-like context "k" with singles A and B trained in context; C trained only in "x" and "y"
    return AdditivePrior(
        deltas={
            ("k", "A"): _vec(1.0),
            ("k", "B"): _vec(0.0, 2.0),
            ("x", "C"): _vec(0.0, 0.0, 3.0),
            ("y", "C"): _vec(0.0, 0.0, 5.0),
            ("x", "A"): _vec(7.0),
        }
    )


def test_a_pair_never_sees_its_own_context(prior: AdditivePrior) -> None:
    # C in x: only y's delta; A in k: only x's delta (k's own answer is left out)
    np.testing.assert_allclose(prior.vector("x", "C"), _vec(0.0, 0.0, 5.0))
    np.testing.assert_allclose(prior.vector("k", "A"), _vec(7.0))
    np.testing.assert_allclose(prior.vector("z", "C"), _vec(0.0, 0.0, 4.0))  # unseen context: the mean
    # B has no other context: nothing to transfer, so the prior is empty and covers nothing
    vec, covered = prior.composition("k", "B")
    np.testing.assert_allclose(vec, np.zeros(G))
    assert covered == ()


def test_a_combination_sums_its_singles_and_names_the_in_context_ones(prior: AdditivePrior) -> None:
    vec, covered = prior.composition("k", "A+B")
    np.testing.assert_allclose(vec, _vec(1.0, 2.0))  # in-context singles, not x's A
    assert covered == ("A", "B")
    # C was never trained in k: its part comes from the other contexts' mean and is not covered
    vec, covered = prior.composition("k", "A+C")
    np.testing.assert_allclose(vec, _vec(1.0, 0.0, 4.0))
    assert covered == ("A",)
    # a part with no single at all adds nothing and is not covered
    vec, covered = prior.composition("k", "B+D")
    np.testing.assert_allclose(vec, _vec(0.0, 2.0))
    assert covered == ("B",)


def test_own_is_the_pairs_training_delta(prior: AdditivePrior) -> None:
    np.testing.assert_allclose(prior.own("k", "B"), _vec(0.0, 2.0))
    assert prior.own("k", "A+B") is None


def _data() -> SimpleNamespace:
    """The slice of ProcessedDataset that GroupPriors reads: groups and vocabularies."""
    perts = ["control", "A", "B", "A+B", "C"]
    groups = pd.DataFrame({"context_id": [0, 0, 0, 0, 1], "pert_id": [0, 1, 2, 3, 4]})
    index = SimpleNamespace(contexts=["k", "x"], perturbations=perts, parts=["A", "B", "C"], groups=groups)
    return SimpleNamespace(index=index)


@pytest.mark.parametrize("cover", [True, False])
def test_group_priors_drop_covered_parts_only_when_asked(prior: AdditivePrior, cover: bool) -> None:
    gp = GroupPriors(prior, _data(), cover=cover)
    groups = torch.tensor([3, 1, 4])  # A+B in k, A in k, C in x
    parts = torch.tensor([[0, 1], [0, -1], [2, -1]])
    out = gp.uncover(groups, parts)
    expected = torch.tensor([[-1, -1], [0, -1], [2, -1]]) if cover else parts
    assert torch.equal(out, expected)
    assert torch.equal(parts, torch.tensor([[0, 1], [0, -1], [2, -1]]))  # input untouched
    own, has = gp.own_batch(groups)
    assert has.tolist() == [False, True, True]
    np.testing.assert_allclose(own[1].numpy(), _vec(1.0))
    np.testing.assert_allclose(own[0].numpy(), np.zeros(G))
    np.testing.assert_allclose(gp.batch(groups)[0].numpy(), _vec(1.0, 2.0))


def test_from_data_is_the_cell_weighted_shift_of_training_pairs_only(tmp_path) -> None:
    # Checked against a direct computation from the cells: each training pair's mean over all its
    # cells (every batch, weighted by cells) minus its own context's control mean; held-out pairs
    # must not be in the prior at all (they would leak into every held-out prediction).
    from bionemo_scale.config import SynthConfig
    from bionemo_scale.data.splits import SplitSpec
    from bionemo_scale.data.store import ProcessedDataset
    from bionemo_scale.data.synth import write_synthetic_dataset

    cfg = SynthConfig(n_cells=1500, n_genes=30, n_programs=3, n_contexts=2, n_batches=2, n_perturbations=4)
    write_synthetic_dataset(tmp_path / "ds", cfg, progress=False)
    data = ProcessedDataset(tmp_path / "ds")
    idx = data.index
    held = {(idx.contexts[0], idx.perturbations[1]), (idx.contexts[1], idx.perturbations[2])}
    spec = SplitSpec(fewshot={idx.contexts[0]: {"val": [idx.perturbations[1]], "test": []},
                              idx.contexts[1]: {"val": [], "test": [idx.perturbations[2]]}})  # fmt: skip
    prior = AdditivePrior.from_data(data, data.split_labels(spec))

    X = data.gather(np.arange(data.n_cells)).astype(np.float64)
    obs = data.obs
    expected = {}
    for ctx in idx.contexts:
        ctrl = X[((obs["context"] == ctx) & (obs["perturbation"] == idx.control_label)).to_numpy()].mean(0)
        for pert in idx.perturbations[1:]:
            if (ctx, pert) not in held:
                cells = ((obs["context"] == ctx) & (obs["perturbation"] == pert)).to_numpy()
                expected[(ctx, pert)] = X[cells].mean(0) - ctrl
    assert set(prior.deltas) == set(expected)
    for key, delta in expected.items():
        np.testing.assert_allclose(prior.deltas[key], delta, rtol=1e-4, atol=1e-5)  # float32 cells
