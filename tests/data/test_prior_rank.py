"""Low-rank denoising of the additive prior: the projection, the CV that picks its rank, and the
round trip through prior.safetensors (a run and its release must predict with the same prior)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bionemo_scale.data.prior import AdditivePrior
from bionemo_scale.data.prior_rank import (
    choose_rank,
    leave_one_out_basis,
    low_rank_basis,
    project,
    rank_scores,
    resolve_rank,
    top_directions,
    top_spectrum,
)
from bionemo_scale.errors import ScaleError


def _screen(n_ctx: int = 5, n_pert: int = 40, genes: int = 60, programs: int = 3, noise: float = 0.6, seed: int = 0):
    """Deltas of a screen whose responses live in `programs` dimensions, plus per-pair noise."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(programs, genes))
    effect = rng.normal(size=(n_pert, programs))
    return {
        (f"c{c}", f"p{p}"): effect[p] @ loadings + noise * rng.normal(size=genes)
        for c in range(n_ctx)
        for p in range(n_pert)
    }, effect @ loadings


def test_the_basis_is_orthonormal_and_the_projection_idempotent() -> None:
    rng = np.random.default_rng(1)
    basis = low_rank_basis(rng.normal(size=(20, 12)), 4)
    assert basis.shape == (4, 12)
    np.testing.assert_allclose(basis @ basis.T, np.eye(4), atol=1e-10)
    v = rng.normal(size=12)
    np.testing.assert_allclose(project(project(v, basis), basis), project(v, basis), atol=1e-10)
    # a rank above the matrix's is capped, not an error
    assert low_rank_basis(rng.normal(size=(3, 12)), 10).shape == (3, 12)
    with pytest.raises(ValueError, match="non-empty"):
        low_rank_basis(np.zeros((0, 12)), 2)


def test_many_pairs_take_the_gram_route_to_the_same_subspace() -> None:
    # more pairs than genes (Tahoe's shape): eigenvectors of DᵀD span what the SVD's top rows span
    rng = np.random.default_rng(4)
    tall = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 25)) + 0.05 * rng.normal(size=(300, 25))
    gram_basis = low_rank_basis(tall, 3)
    svd_basis = np.linalg.svd(tall, full_matrices=False)[2][:3]
    np.testing.assert_allclose(gram_basis.T @ gram_basis, svd_basis.T @ svd_basis, atol=1e-8)
    # a rank-2 Gram yields two directions however many are asked for
    low = rng.normal(size=(40, 2)) @ rng.normal(size=(2, 10))
    assert top_directions(low.T @ low, 6).shape == (2, 10)
    # the CV downdates that Gram per fold and still finds the true rank
    priors = tall + 0.5 * rng.normal(size=tall.shape)
    assert choose_rank(tall, priors)[0] == 3


def test_cv_finds_the_true_rank_of_a_low_rank_screen() -> None:
    deltas, _ = _screen(noise=1.0)
    prior = AdditivePrior(deltas)
    keys = sorted(deltas)
    matrix = np.stack([deltas[k] for k in keys])
    priors = np.stack([prior.vector(*k) for k in keys])
    best, scores = choose_rank(matrix, priors)
    assert best == 3, scores
    assert scores[3] > scores[None] + 0.02  # the projection is worth it, not a tie


def test_cv_declines_when_the_responses_are_full_rank() -> None:
    # every gene an independent response: no subspace to project on, so "auto" must not project
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(40, 30))
    deltas = {(f"c{c}", f"p{p}"): truth[p] + 0.3 * rng.normal(size=30) for c in range(4) for p in range(40)}
    prior = AdditivePrior(deltas).with_rank("auto")
    assert prior.rank is None


def test_pairs_with_an_empty_prior_are_not_scored() -> None:
    deltas = np.eye(6)
    priors = np.zeros((6, 6))
    priors[:5] = np.eye(6)[:5]
    scores = rank_scores(deltas, priors, ranks=[1, 2], folds=5)
    assert set(scores) == {1, 2, None}
    assert choose_rank(deltas, np.zeros((6, 6)))[0] is None  # nothing to score at all


def test_denoising_brings_a_held_out_prior_closer_to_the_truth() -> None:
    deltas, truth = _screen(seed=3)
    held = ("c0", "p7")
    train = {k: v for k, v in deltas.items() if k != held}
    raw, denoised = AdditivePrior(train), AdditivePrior(train).with_rank("auto")
    assert denoised.rank == 3
    err_raw = np.linalg.norm(raw.vector(*held) - truth[7])
    err_denoised = np.linalg.norm(denoised.vector(*held) - truth[7])
    assert err_denoised < 0.7 * err_raw
    # composition results are projected too, and the covered parts are unchanged
    combo = {("c0", "p1"): deltas[("c0", "p1")], ("c0", "p2"): deltas[("c0", "p2")], **train}
    vec, covered = AdditivePrior(combo, basis=denoised.basis).composition("c0", "p1+p2")
    np.testing.assert_allclose(vec, project(deltas[("c0", "p1")] + deltas[("c0", "p2")], denoised.basis))
    assert covered == ("p1", "p2")


def _projector(basis: np.ndarray) -> np.ndarray:
    return basis.T @ basis  # the same subspace whatever the signs or rotation of its rows


@pytest.mark.parametrize("shape", [(30, 50), (200, 40)])  # the SVD route and the Gram route
def test_the_leave_one_out_basis_is_the_basis_of_the_other_deltas(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    deltas = rng.normal(size=(shape[0], 4)) @ rng.normal(size=(4, shape[1])) + 0.3 * rng.normal(size=shape)
    values, vectors = top_spectrum(deltas, shape[1])
    for i in (0, 7, shape[0] - 1):
        rebuilt = leave_one_out_basis(values, vectors, deltas[i], 3)
        without = low_rank_basis(np.delete(deltas, i, axis=0), 3)
        np.testing.assert_allclose(_projector(rebuilt), _projector(without), atol=1e-8)
        # and it is not the full basis: one pair's delta does move the subspace
        assert np.abs(_projector(rebuilt) - _projector(vectors[:3])).max() > 1e-4


def test_a_training_pair_is_not_projected_on_its_own_delta() -> None:
    # The leak this guards against: a training pair's prior projected onto a basis that contains
    # its own delta fits that delta better than any held-out pair's prior can fit its own.
    deltas, _ = _screen(n_ctx=3, n_pert=30, genes=40, noise=1.0, seed=6)
    prior = AdditivePrior(deltas).with_rank(3)
    keys = sorted(deltas)
    for key in (keys[0], keys[31]):
        others = np.stack([deltas[k] for k in keys if k != key])
        expected = project(AdditivePrior(deltas).vector(*key), low_rank_basis(others, 3))
        np.testing.assert_allclose(prior.vector(*key), expected, atol=1e-8)
    # a pair that is not a training pair (held out) keeps the full basis
    held = AdditivePrior({k: v for k, v in deltas.items() if k != keys[0]}).with_rank(3)
    np.testing.assert_allclose(_projector(held.basis_for(*keys[0])), _projector(held.basis), atol=1e-12)
    # the full basis makes training priors fit their own deltas better (helper-measured: 0.43 vs
    # 0.36 at rank 5 on 3 contexts x 40 perturbations; small here, but one-sided)
    leaky = AdditivePrior(deltas).with_rank(3, leave_one_out=False)  # model.prior_basis_leave_one_out=false
    assert leaky.spectrum is None
    np.testing.assert_allclose(leaky.vector(*keys[0]), project(AdditivePrior(deltas).vector(*keys[0]), prior.basis))
    fit = lambda p: np.mean([np.corrcoef(p.vector(*k), deltas[k])[0, 1] for k in keys])  # noqa: E731
    assert fit(leaky) > fit(prior)


def test_resolve_rank_reads_the_config_values() -> None:
    deltas, _ = _screen()
    matrix = np.stack(list(deltas.values()))
    never = lambda: pytest.fail("the CV must not run for a fixed rank")  # noqa: E731
    assert resolve_rank(None, matrix, never) is None
    assert resolve_rank(0, matrix, never) is None
    assert resolve_rank(5, matrix, never) == 5
    assert AdditivePrior(deltas).with_rank(None).basis is None
    with pytest.raises(ValueError, match="positive integer"):
        resolve_rank(-2, matrix, never)


def test_the_basis_survives_save_and_load(tmp_path: Path) -> None:
    deltas, _ = _screen(n_pert=10)
    prior = AdditivePrior(deltas).with_rank(4)
    prior.save(tmp_path / "prior.safetensors")
    loaded = AdditivePrior.load(tmp_path / "prior.safetensors")
    assert loaded.rank == 4
    # ("c1", "p2") is a training pair: its leave-one-out basis must survive too
    assert loaded.spectrum is not None
    np.testing.assert_allclose(loaded.vector("c1", "p2"), prior.vector("c1", "p2"), atol=1e-5)
    assert np.abs(loaded.vector("c1", "p2") - project(prior.vector("c1", "p2"), prior.basis)).max() > 1e-3
    # a prior saved without a basis loads without one (files from before prior_rank)
    AdditivePrior(deltas).save(tmp_path / "raw.safetensors")
    assert AdditivePrior.load(tmp_path / "raw.safetensors").basis is None


@pytest.mark.parametrize("bad", [-2, "lots", True, 2.5])
def test_the_config_refuses_a_bad_rank(bad: object) -> None:
    # a negative rank would silently slice the basis from the end (vt[:-2]): it must not get that far
    from bionemo_scale.config import apply_overrides
    from bionemo_scale.recipes import get_recipe

    with pytest.raises(ScaleError, match=r"invalid .*model\.prior_rank: must be a positive integer, 'auto' or null"):
        apply_overrides(get_recipe("tiny_cpu"), [f"model.prior_rank={bad}"])
    for good, expected in (("auto", "auto"), ("16", 16), ("0", 0), ("null", None)):
        assert apply_overrides(get_recipe("tiny_cpu"), [f"model.prior_rank={good}"]).model.prior_rank == expected
