"""Tests for the straight conditional path and the endpoint <-> velocity conversion."""

from __future__ import annotations

import pytest
import torch

from bionemo_scale.flow.paths import endpoint_to_velocity, expand_time, linear_path, velocity_to_endpoint


def _pair(b: int = 3, s: int = 5, d: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, s, d, generator=g, dtype=dtype), torch.randn(b, s, d, generator=g, dtype=dtype)


def test_linear_path_endpoints_are_exact() -> None:
    z0, z1 = _pair()
    assert torch.equal(linear_path(z0, z1, 0.0), z0)
    assert torch.equal(linear_path(z0, z1, 1.0), z1)
    torch.testing.assert_close(linear_path(z0, z1, 0.25), 0.75 * z0 + 0.25 * z1)


def test_linear_path_broadcasts_one_time_per_set() -> None:
    z0, z1 = _pair(b=3)
    t = torch.tensor([0.0, 0.5, 1.0])
    zt = linear_path(z0, z1, t)
    assert zt.shape == z0.shape
    assert torch.equal(zt[0], z0[0])
    torch.testing.assert_close(zt[1], 0.5 * (z0[1] + z1[1]))
    assert torch.equal(zt[2], z1[2])


def test_linear_path_per_cell_time_and_unbatched() -> None:
    z0, z1 = _pair(b=2, s=3)
    t = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(linear_path(z0, z1, t), (1 - t[..., None]) * z0 + t[..., None] * z1)
    torch.testing.assert_close(linear_path(z0[0], z1[0], 0.3), 0.7 * z0[0] + 0.3 * z1[0])


def test_linear_path_keeps_low_precision_dtype() -> None:
    z0, z1 = _pair(dtype=torch.bfloat16)
    out = linear_path(z0, z1, torch.tensor([0.1, 0.2, 0.3]))
    assert out.dtype == torch.bfloat16


def test_linear_path_rejects_shape_mismatch() -> None:
    z0, z1 = _pair()
    with pytest.raises(ValueError, match="same shape"):
        linear_path(z0, z1[:, :-1], 0.5)


def test_expand_time_aligns_leading_dims() -> None:
    like = torch.zeros(4, 5, 6)
    assert expand_time(torch.ones(4), like).shape == (4, 1, 1)
    assert expand_time(torch.ones(4, 5), like).shape == (4, 5, 1)
    assert expand_time(0.5, like).shape == (1, 1, 1)
    assert expand_time(0.5, like).dtype == torch.float32
    assert expand_time(0.5, like.double()).dtype == torch.float64
    assert expand_time(0.5, like.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="leading dims"):
        expand_time(torch.ones(5), like)
    with pytest.raises(ValueError, match="dims"):
        expand_time(torch.ones(4, 5, 6, 1), like)


def test_endpoint_to_velocity_on_straight_path_is_constant() -> None:
    z0, z1 = _pair(dtype=torch.float64)
    for t in (torch.tensor([0.0, 0.3, 0.9]), 0.5):
        zt = linear_path(z0, z1, t)
        torch.testing.assert_close(endpoint_to_velocity(z1, zt, t), z1 - z0)


def test_endpoint_velocity_round_trip() -> None:
    z0, z1 = _pair(dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    v = endpoint_to_velocity(z1, z0, t)
    torch.testing.assert_close(velocity_to_endpoint(v, z0, t), z1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_endpoint_to_velocity_is_finite_at_t_one(dtype: torch.dtype) -> None:
    z0, z1 = _pair(dtype=dtype)
    v = endpoint_to_velocity(z1, z0, torch.ones(3), eps=1e-4)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v.float(), ((z1 - z0) / 1e-4).to(dtype).float(), rtol=1e-2, atol=0.0)
    with pytest.raises(ValueError, match="eps"):
        endpoint_to_velocity(z1, z0, 0.5, eps=0.0)
