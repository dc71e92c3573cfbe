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
