"""Tests for the endpoint and set-level losses."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from bionemo_scale.flow.losses import (
    endpoint_mse,
    energy_distance,
    pairwise_distances,
    pairwise_sq_distances,
    rbf_mmd,
)


def _sets(b: int = 3, n: int = 7, m: int = 11, d: int = 5, *, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=dtype)
    y = 0.8 * torch.randn(b, m, d, generator=g, dtype=dtype) + 0.5
    return x, y


def _naive_energy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: half the textbook energy distance with explicit differences (floor sqrt(1e-8) like geomloss)."""

    def mean_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a[:, :, None] - b[:, None]).square().sum(-1).clamp_min(1e-8).sqrt().mean((-1, -2))

    return mean_dist(x, y) - 0.5 * (mean_dist(x, x) + mean_dist(y, y))


# ----------------------------------------------------------------------------- endpoint_mse


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_endpoint_mse_matches_torch(reduction: str) -> None:
    pred, target = _sets(n=6, m=6, dtype=torch.float32)
    torch.testing.assert_close(
        endpoint_mse(pred, target, reduction),  # type: ignore[arg-type]
        F.mse_loss(pred, target, reduction=reduction),  # type: ignore[arg-type]
    )


def test_endpoint_mse_per_set() -> None:
    pred, target = _sets(n=6, m=6)
    per_set = endpoint_mse(pred, target, "per_set")
    assert per_set.shape == (3,)
    torch.testing.assert_close(per_set.mean(), endpoint_mse(pred, target))
    torch.testing.assert_close(per_set[1], F.mse_loss(pred[1], target[1]))
    with pytest.raises(ValueError, match="same shape"):
        endpoint_mse(pred, target[:, :5])
    with pytest.raises(ValueError, match="reduction"):
        endpoint_mse(pred, target, "max")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- distances


def test_pairwise_distances_match_direct_computation() -> None:
    x, y = _sets()
    direct = (x[:, :, None] - y[:, None]).square().sum(-1)
    torch.testing.assert_close(pairwise_sq_distances(x, y), direct)
    torch.testing.assert_close(pairwise_distances(x, y), direct.sqrt())
    self_d = pairwise_distances(x)
    torch.testing.assert_close(self_d, (x[:, :, None] - x[:, None]).square().sum(-1).clamp_min(1e-8).sqrt())
    assert torch.equal(torch.diagonal(self_d, dim1=-2, dim2=-1), torch.full((3, 7), 1e-4, dtype=torch.float64))


def test_pairwise_distances_float32_accuracy_on_offset_data() -> None:
    # Data far from the origin: the naive expansion loses digits, the centred one must not.
    x, y = _sets(n=40, m=40, d=256, dtype=torch.float64)
    x, y = x + 50.0, y + 50.0
    ref = pairwise_distances(x, y)
    torch.testing.assert_close(pairwise_distances(x.float(), y.float()).double(), ref, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- energy distance


def test_energy_distance_matches_geomloss_float64_batched_unequal_sizes() -> None:
    import geomloss  # a declared test dependency (the [test] extra): missing means a broken install

    loss = geomloss.SamplesLoss("energy")
    x, y = _sets(b=4, n=7, m=13, d=6)
    ours = energy_distance(x, y)
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, loss(x, y), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, _naive_energy(x, y), rtol=0, atol=1e-10)
    # Unbatched inputs give a scalar, like geomloss.
    one = energy_distance(x[0], y[0])
    assert one.shape == ()
    torch.testing.assert_close(one, loss(x[0], y[0]), rtol=0, atol=1e-5)


def test_energy_distance_gradient_matches_geomloss() -> None:
    import geomloss  # a declared test dependency (the [test] extra): missing means a broken install

    x, y = _sets(b=2, n=9, m=5, d=4)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    energy_distance(xa, ya).sum().backward()
    geomloss.SamplesLoss("energy")(xb, yb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ya.grad, yb.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("d", [6, 64])
def test_energy_distance_float32_agrees_with_geomloss_reference(d: int) -> None:
    import geomloss  # a declared test dependency (the [test] extra): missing means a broken install

    x32, y32 = _sets(b=4, n=12, m=20, d=d, dtype=torch.float32, seed=1)
    ours = energy_distance(x32, y32)
    assert ours.dtype == torch.float32
    # geomloss on the same (float32) numbers, evaluated exactly (float64): its own float32 run carries
    # ~1e-4 of self-distance rounding noise, which ours avoids.
    ref = geomloss.SamplesLoss("energy")(x32.double(), y32.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, geomloss.SamplesLoss("energy")(x32, y32), rtol=1e-3, atol=1e-3)


def test_compute_dtype_upcasts_float32_inputs() -> None:
    import geomloss  # a declared test dependency (the [test] extra): missing means a broken install

    x32, y32 = _sets(b=2, n=6, m=9, dtype=torch.float32)
    got = energy_distance(x32, y32, compute_dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, geomloss.SamplesLoss("energy")(x32.double(), y32.double()), rtol=0, atol=1e-12)
    assert rbf_mmd(x32, y32, compute_dtype=torch.float64).dtype == torch.float64
    assert pairwise_distances(x32.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype"):
        energy_distance(x32, y32, compute_dtype=torch.bfloat16)


def test_energy_distance_zero_for_identical_sets_and_positive_for_shifted() -> None:
    x, _ = _sets()
    assert energy_distance(x, x).abs().max() < 1e-12
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert energy_distance(x, x[:, perm]).abs().max() < 1e-6  # a set has no order
    x32 = x.float()
    # float32: points coinciding across the two sets keep ~sqrt(ulp) of rounding in the cross term (the
    # self terms have an exact diagonal), leaving ~1e-5; geomloss has the same order of error ...
    assert energy_distance(x32, x32.clone()).abs().max() < 1e-4
    # ... which a float64 computation removes.
    assert energy_distance(x32, x32.clone(), compute_dtype=torch.float64).abs().max() < 1e-12
    shifts = [0.1, 0.5, 1.0, 2.0]
    values = [energy_distance(x, x + s).min().item() for s in shifts]
    assert values[0] > 0
    assert all(a < b for a, b in itertools.pairwise(values))


def test_energy_distance_is_symmetric_and_nonnegative() -> None:
    x, y = _sets(n=8, m=3)
    torch.testing.assert_close(energy_distance(x, y), energy_distance(y, x), rtol=1e-12, atol=1e-12)
    assert (energy_distance(x, y) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_distance_gradient_is_finite_at_coincident_points(dtype: torch.dtype) -> None:
    x, _ = _sets(n=6, dtype=dtype)
    x = torch.cat([x, x[:, :2]], dim=1).requires_grad_()  # duplicated cells inside the set
    y = x.detach().clone().requires_grad_()  # and the other set identical
    energy_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # A naive sqrt of the squared distances is NaN here, which is what the eps floor prevents.
    xn = x.detach().clone().requires_grad_()
    (xn[:, :, None] - xn[:, None]).square().sum(-1).sqrt().sum().backward()
    assert not torch.isfinite(xn.grad).all()


def test_energy_distance_under_bf16_autocast_stays_float32() -> None:
    x, y = _sets(n=16, m=24, d=32, dtype=torch.float32)
    x, y = x + 3.0, y + 3.0
    ref = energy_distance(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = energy_distance(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_set_losses_reject_bad_shapes() -> None:
    x, y = _sets()
    with pytest.raises(ValueError, match="feature dim"):
        energy_distance(x, y[..., :3])
    with pytest.raises(ValueError, match="batch size"):
        rbf_mmd(x, y[:2])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        energy_distance(x, y[0])


# ----------------------------------------------------------------------------- RBF MMD


def _naive_mmd(x: torch.Tensor, y: torch.Tensor, sigmas: tuple[float, ...]) -> torch.Tensor:
    def mean_k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a[:, :, None] - b[:, None]).square().sum(-1)
        return torch.stack([torch.exp(-d2 / (2 * s**2)) for s in sigmas]).mean(0).mean((-1, -2))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def test_rbf_mmd_matches_reference() -> None:
    x, y = _sets(n=6, m=9)
    sigmas = (0.3, 1.0, 3.0)
    got = rbf_mmd(x, y, sigmas)
    assert got.shape == (3,)
    torch.testing.assert_close(got, _naive_mmd(x, y, sigmas), rtol=1e-10, atol=1e-12)
    assert rbf_mmd(x[0], y[0], sigmas).shape == ()


def test_rbf_mmd_zero_for_identical_and_increasing_with_shift() -> None:
    x, _ = _sets(n=20)
    assert rbf_mmd(x, x).abs().max() < 1e-12
    assert rbf_mmd(x.float(), x.float().clone()).abs().max() < 1e-6
    values = [rbf_mmd(x, x + s).min().item() for s in (0.1, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] > 0
    assert all(a < b for a, b in itertools.pairwise(values))


def test_rbf_mmd_median_heuristic_is_scale_free() -> None:
    x, y = _sets(n=10, m=12)
    a = rbf_mmd(x, y, (0.5, 1.0, 2.0), median_heuristic=True)
    b = rbf_mmd(100.0 * x, 100.0 * y, (0.5, 1.0, 2.0), median_heuristic=True)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(rbf_mmd(x, y), rbf_mmd(100.0 * x, 100.0 * y))


def test_rbf_mmd_gradient_finite_and_bandwidth_validation() -> None:
    x, _ = _sets(n=5)
    x = x.requires_grad_()
    rbf_mmd(x, x.detach().clone(), median_heuristic=True).sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="bandwidths"):
        rbf_mmd(x, x, ())
    with pytest.raises(ValueError, match="bandwidths"):
        rbf_mmd(x, x, (1.0, -1.0))


def test_reduced_matmul_precision_keeps_set_distances_in_float64() -> None:
    """Under TF32/bf16 matmul precision the distance expansion would lose digits, so it runs in float64."""
    import geomloss

    from bionemo_scale.matmul_precision import float32_matmul_precision, reduced_matmul_precision

    x32, y32 = _sets(b=2, n=6, m=9, dtype=torch.float32)
    assert not reduced_matmul_precision() and energy_distance(x32, y32).dtype == torch.float32
    with float32_matmul_precision("medium"):
        assert reduced_matmul_precision()
        got = energy_distance(x32, y32)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, geomloss.SamplesLoss("energy")(x32.double(), y32.double()), rtol=0, atol=1e-12)
        assert pairwise_sq_distances(x32).dtype == torch.float64
        assert energy_distance(x32, y32, compute_dtype=torch.float32).dtype == torch.float32  # an explicit ask wins
    assert torch.get_float32_matmul_precision() == "highest"


def test_matmul_precision_is_restored_after_errors_and_checked() -> None:
    from bionemo_scale.matmul_precision import float32_matmul_precision

    with pytest.raises(RuntimeError, match="inside"), float32_matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
        raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError, match="matmul precision"), float32_matmul_precision("low"):
        pass
