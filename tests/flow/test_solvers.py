"""Tests for the endpoint-parameterised Euler and Heun solvers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bionemo_scale.flow.paths import linear_path
from bionemo_scale.flow.solvers import NFECounter, euler_endpoint, heun_endpoint, nfe, solve_endpoint
from bionemo_scale.flow.timesteps import time_grid

SOLVERS = [euler_endpoint, heun_endpoint]


def _z(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _nonlinear_model(zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A time-dependent, non-linear stand-in for the network."""
    w = torch.linspace(-1.0, 1.0, zt.shape[-1] ** 2, dtype=zt.dtype).reshape(zt.shape[-1], zt.shape[-1])
    return torch.tanh(zt @ w) + t.to(zt.dtype).reshape(-1, 1, 1) * zt.mean(-2, keepdim=True)


def _oracle(z1: torch.Tensor) -> NFECounter:
    """The exact endpoint of a straight path, whatever (zt, t)."""
    return NFECounter(lambda zt, t: z1)


def _endpoint_from_velocity(v):
    """Endpoint model implied by a velocity field: z1_hat(z, t) = z + (1 - t)·v(z, t)."""
    return lambda z, t: z + (1 - t.to(z.dtype).reshape(-1, 1, 1)) * v(z, t)


def _decay(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dz/dt = -(1 + t)·z, so z(1) = z(0)·exp(-3/2)."""
    return -(1 + t.to(z.dtype).reshape(-1, 1, 1)) * z


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_step_is_the_endpoint_prediction(solver) -> None:
    z0 = _z()
    model = NFECounter(_nonlinear_model)
    out = solver(model, z0, steps=1)
    assert torch.equal(out, _nonlinear_model(z0, torch.zeros(3)))
    assert model.nfe == 1
    assert torch.equal(model.times[0], torch.zeros(3))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_exact_oracle_lands_exactly_on_z1(solver, steps: int) -> None:
    z0, z1 = _z(seed=0), _z(seed=1)
    out, traj = solver(_oracle(z1), z0, steps=steps, return_trajectory=True)
    assert torch.equal(out, z1)
    assert traj.shape == (steps + 1, *z0.shape)
    assert torch.equal(traj[0], z0) and torch.equal(traj[-1], out)
    # With the true endpoint every intermediate state stays on the straight path.
    for k, t in enumerate(time_grid(steps)):
        torch.testing.assert_close(traj[k], linear_path(z0, z1, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_oracle_from_intermediate_start(solver) -> None:
    z0, z1 = _z(seed=0), _z(seed=1)
    z_half = linear_path(z0, z1, 0.5)
    assert torch.equal(solver(_oracle(z1), z_half, steps=3, t0=0.5), z1)
    z_mid = solver(_oracle(z1), z0, steps=4, t1=0.75)
    torch.testing.assert_close(z_mid, linear_path(z0, z1, 0.75))


def _errors(solver, steps_list: list[int]) -> list[float]:
    z0 = _z(torch.float64)
    exact = z0 * math.exp(-1.5)
    model = _endpoint_from_velocity(_decay)
    return [float((solver(model, z0, steps=k) - exact).abs().max()) for k in steps_list]


def test_euler_is_first_order() -> None:
    errs = _errors(euler_endpoint, [16, 32, 64])
    for coarse, fine in itertools.pairwise(errs):
        assert 1.8 < coarse / fine < 2.2


def test_heun_is_second_order_despite_the_final_euler_step() -> None:
    errs = _errors(heun_endpoint, [16, 32, 64])
    for coarse, fine in itertools.pairwise(errs):
        assert 3.6 < coarse / fine < 4.4
    assert errs[-1] < _errors(euler_endpoint, [64])[0] / 10


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_nfe_counts_and_no_evaluation_at_t_one(steps: int) -> None:
    z0 = _z()
    for method, solver in (("euler", euler_endpoint), ("heun", heun_endpoint)):
        for t1 in (1.0, 0.6):
            model = NFECounter(_nonlinear_model)
            solver(model, z0, steps=steps, t1=t1)
            assert model.nfe == nfe(method, steps, t1)  # type: ignore[arg-type]
            assert max(float(t.max()) for t in model.times) < 1.0
            assert all(t.shape == (3,) for t in model.times)
    assert nfe("euler", steps) == steps
    assert nfe("heun", steps) == 2 * steps - 1
    assert nfe("heun", steps, t1=0.5) == 2 * steps


def test_model_time_is_float32_for_low_precision_states() -> None:
    model = NFECounter(lambda z, t: z)
    euler_endpoint(model, _z(torch.bfloat16), steps=2)
    assert all(t.dtype == torch.float32 for t in model.times)
    model = NFECounter(lambda z, t: z)
    heun_endpoint(model, _z(torch.float64), steps=2)
    assert all(t.dtype == torch.float64 for t in model.times)


def test_solve_endpoint_dispatch_and_errors() -> None:
    z0 = _z()
    for method, solver in (("euler", euler_endpoint), ("heun", heun_endpoint)):
        assert torch.equal(solve_endpoint(_nonlinear_model, z0, method, 3), solver(_nonlinear_model, z0, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown solver"):
        solve_endpoint(_nonlinear_model, z0, "rk4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown solver"):
        nfe("rk4", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        euler_endpoint(_nonlinear_model, z0, steps=0)
    with pytest.raises(ValueError, match="t0"):
        heun_endpoint(_nonlinear_model, z0, steps=2, t0=1.0)
