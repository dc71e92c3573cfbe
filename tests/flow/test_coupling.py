"""Tests for in-set minibatch OT coupling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from bionemo_scale.flow.coupling import (
    apply_coupling,
    couple,
    coupling_cost,
    identity_coupling,
    ot_coupling,
    sinkhorn_greedy_assignment,
    squared_cost_matrix,
)


def _sets(b: int, s: int, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, d, generator=g, dtype=torch.float64), torch.randn(
        b, s, d, generator=g, dtype=torch.float64
    )


def _is_permutation(perm: torch.Tensor) -> bool:
    s = perm.shape[-1]
    return bool((perm.sort(dim=-1).values == torch.arange(s)).all())


def _brute_force(x0: torch.Tensor, x1: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    s = x0.shape[0]
    best = min((float((x0 - x1[list(p)]).square().sum()), p) for p in itertools.permutations(range(s)))
    return best


@pytest.mark.parametrize("s", [1, 2, 3, 4, 5, 6])
def test_ot_matches_brute_force(s: int) -> None:
    x0, x1 = _sets(4, s, seed=s)
    perm = ot_coupling(x0, x1)
    assert perm.shape == (4, s) and perm.dtype == torch.long
    for b in range(4):
        best_cost, best_perm = _brute_force(x0[b], x1[b])
        cost = float((x0[b] - x1[b, perm[b]]).square().sum())
        assert cost == pytest.approx(best_cost, rel=1e-12, abs=1e-12)
        assert tuple(perm[b].tolist()) == best_perm  # continuous data: the optimum is unique


def test_ot_is_permutation_and_no_worse_than_identity() -> None:
    x0, x1 = _sets(5, 64, d=8)
    perm = ot_coupling(x0, x1)
    assert _is_permutation(perm)
    ot_cost = coupling_cost(x0, x1, perm)
    id_cost = coupling_cost(x0, x1, identity_coupling(x0, x1))
    assert (ot_cost <= id_cost + 1e-12).all()
    assert (ot_cost < 0.8 * id_cost).all()  # random sets: OT should shorten paths a lot


def test_ot_is_exact_on_larger_sets() -> None:
    # At S=64 an approximate assignment would not hit the optimum; the exact path must.
    x0, x1 = _sets(3, 64, d=2, seed=5)
    perm = ot_coupling(x0, x1)
    for b in range(3):
        cost = squared_cost_matrix(x0[b], x1[b]).numpy()
        rows, cols = linear_sum_assignment(cost)
        assert cost[np.arange(64), perm[b].numpy()].sum() == pytest.approx(cost[rows, cols].sum(), rel=1e-12)


def test_ot_recovers_a_hidden_matching() -> None:
    x0, _ = _sets(2, 20, d=4)
    sigma = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    x1 = x0[:, sigma] + 1e-3 * torch.randn(2, 20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    paired = apply_coupling(x1, ot_coupling(x0, x1))
    torch.testing.assert_close(paired, x0, atol=1e-2, rtol=0)


def test_ot_invariant_under_relabeling() -> None:
    x0, x1 = _sets(3, 12, d=5)
    pairs = apply_coupling(x1, ot_coupling(x0, x1))
    g = torch.Generator().manual_seed(1)
    sigma, tau = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
    # Relabel the perturbed set: each control cell keeps the same partner.
    x1s = x1[:, sigma]
    assert torch.equal(apply_coupling(x1s, ot_coupling(x0, x1s)), pairs)
    # Relabel the control set: the partners move with their control cells.
    x0t = x0[:, tau]
    assert torch.equal(apply_coupling(x1, ot_coupling(x0t, x1)), pairs[:, tau])


def test_ot_unbatched_and_float32() -> None:
    x0, x1 = _sets(1, 6)
    perm = ot_coupling(x0[0].float(), x1[0].float())
    assert perm.shape == (6,)
    assert torch.equal(perm, ot_coupling(x0, x1)[0])


def test_ot_thread_pool_gives_same_result() -> None:
    x0, x1 = _sets(6, 32)
    assert torch.equal(ot_coupling(x0, x1, num_threads=3), ot_coupling(x0, x1))


def test_fallback_returns_good_permutation_on_structured_data() -> None:
    # Well separated clusters, x1 a shuffled noisy copy of x0: the right pairing is obvious.
    g = torch.Generator().manual_seed(0)
    b, s, d = 3, 48, 6
    centers = 10.0 * torch.randn(s, d, generator=g, dtype=torch.float64)
    x0 = centers + 0.05 * torch.randn(b, s, d, generator=g, dtype=torch.float64)
    sigma = torch.stack([torch.randperm(s, generator=g) for _ in range(b)])
    x1 = apply_coupling(x0, sigma) + 0.05 * torch.randn(b, s, d, generator=g, dtype=torch.float64)
    approx = ot_coupling(x0, x1, max_exact=8)
    exact = ot_coupling(x0, x1)
    assert approx.shape == (b, s) and _is_permutation(approx)
    id_cost = coupling_cost(x0, x1, identity_coupling(x0, x1))
    approx_cost = coupling_cost(x0, x1, approx)
    assert (approx_cost <= id_cost).all()
    torch.testing.assert_close(approx_cost, coupling_cost(x0, x1, exact), rtol=1e-2, atol=1e-6)


def test_fallback_on_random_sets_is_near_optimal_and_never_worse_than_identity() -> None:
    x0, x1 = _sets(4, 40, d=4)
    approx = ot_coupling(x0, x1, max_exact=16)
    assert _is_permutation(approx)
    approx_cost = coupling_cost(x0, x1, approx)
    assert (approx_cost <= coupling_cost(x0, x1, identity_coupling(x0, x1))).all()
    assert (approx_cost <= 1.25 * coupling_cost(x0, x1, ot_coupling(x0, x1))).all()


def test_fallback_keeps_identity_when_identity_is_optimal() -> None:
    x0, _ = _sets(2, 30, d=3)
    x1 = x0 + 1e-6
    perm = sinkhorn_greedy_assignment(squared_cost_matrix(x0, x1))
    assert torch.equal(perm, identity_coupling(x0, x1))


def test_fallback_guard_keeps_identity_when_greedy_rounding_is_worse() -> None:
    # 1-D: x0 = {0, 1}, x1 = {0.6, 1.6}. Without Sinkhorn iterations the greedy rounding pairs 1 -> 0.6
    # first (cost 0.16) and is left with 0 -> 1.6 (total 2.72); the identity costs 0.72 and must win.
    x0 = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    x1 = torch.tensor([[[0.6], [1.6]]], dtype=torch.float64)
    perm = sinkhorn_greedy_assignment(squared_cost_matrix(x0, x1), iters=0)
    assert torch.equal(perm, torch.tensor([[0, 1]]))
    # With the Sinkhorn iterations the plan itself points at the optimum, even from a crossed labelling.
    assert torch.equal(sinkhorn_greedy_assignment(squared_cost_matrix(x0, x1.flip(1))), torch.tensor([[1, 0]]))


def test_identity_coupling() -> None:
    x0, x1 = _sets(3, 7)
    perm = identity_coupling(x0, x1)
    assert torch.equal(perm, torch.arange(7).expand(3, 7))
    assert torch.equal(apply_coupling(x1, perm), x1)
    assert torch.equal(identity_coupling(x0[0], x1[0]), torch.arange(7))


def test_apply_coupling_gathers_trailing_dims_and_is_differentiable() -> None:
    x1 = torch.randn(2, 4, 3, 2, requires_grad=True)
    perm = torch.tensor([[2, 0, 3, 1], [1, 2, 3, 0]])
    out = apply_coupling(x1, perm)
    for b in range(2):
        for i in range(4):
            assert torch.equal(out[b, i], x1[b, perm[b, i]])
    out.sum().backward()
    assert torch.equal(x1.grad, torch.ones_like(x1))
    assert torch.equal(apply_coupling(x1[0], perm[0]), x1[0, perm[0]])
    with pytest.raises(ValueError, match="leading"):
        apply_coupling(x1, perm[:, :3])


def test_squared_cost_matrix_matches_direct_computation() -> None:
    x0, x1 = _sets(2, 5, d=4)
    direct = (x0[:, :, None] - x1[:, None]).square().sum(-1)
    torch.testing.assert_close(squared_cost_matrix(x0, x1), direct)


def test_couple_dispatch_and_errors() -> None:
    x0, x1 = _sets(2, 5)
    assert torch.equal(couple(x0, x1, "ot"), ot_coupling(x0, x1))
    assert torch.equal(couple(x0, x1, "identity"), identity_coupling(x0, x1))
    with pytest.raises(ValueError, match="unknown coupling"):
        couple(x0, x1, "sinkhorn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        ot_coupling(x0, x1[:, :4])
    with pytest.raises(ValueError, match="same shape"):
        identity_coupling(x0, x1[:, :, :2])
    with pytest.raises(ValueError, match=r"\[S, D\]"):
        ot_coupling(x0[..., None], x1[..., None])
