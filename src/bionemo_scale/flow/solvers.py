"""ODE solvers for an *endpoint-parameterised* flow.

The network predicts the endpoint, ``predict_endpoint(zt, t) -> z1_hat`` with ``t`` a ``[B]`` tensor;
the velocity it implies on a straight path is ``v = (z1_hat - zt) / (1 - t)``. Writing the Euler update
``z + h·v`` as a blend ``z + (h/(1-t))·(z1_hat - z)`` and, on a step that ends at ``t = 1``, returning
``z1_hat`` itself (the blend weight is exactly 1 there) has two consequences:

* one Euler step from ``t = 0`` *is* the endpoint prediction (NFE = 1), bit for bit;
* the solvers never evaluate the network at ``t = 1``, where ``v`` is 0/0.

Heun's method (2nd order) uses two evaluations per step, except on a final step that ends at ``t = 1``:
its corrector would need ``v`` at ``t = 1``, so that step is an Euler step (the endpoint predicted from
the last grid point). One Euler step adds an O(h²) error, so the method stays 2nd order globally;
NFE = ``2·steps - 1`` when ``t1 = 1`` and ``2·steps`` otherwise.

The solvers do not touch autograd: wrap calls in ``torch.no_grad()`` for inference.
The ``t`` handed to the model is float32 (float64 for float64 states), on the state's device.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal, overload

import torch

from bionemo_scale.flow.paths import time_dtype
from bionemo_scale.flow.timesteps import time_grid

__all__ = [
    "EndpointFn",
    "NFECounter",
    "SolverMethod",
    "euler_endpoint",
    "heun_endpoint",
    "nfe",
    "solve_endpoint",
]

EndpointFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SolverMethod = Literal["euler", "heun"]


class NFECounter:
    """Wrap an endpoint model and count its calls (``.nfe``); for tests and for logging inference cost."""

    def __init__(self, fn: EndpointFn) -> None:
        self.fn = fn
        self.nfe = 0
        self.times: list[torch.Tensor] = []

    def __call__(self, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        self.times.append(t.detach().clone())
        return self.fn(zt, t)


def nfe(method: SolverMethod, steps: int, t1: float = 1.0) -> int:
    """Number of network evaluations a solve costs (see the module docstring)."""
    if method == "euler":
        return steps
    if method == "heun":
        return 2 * steps - 1 if t1 >= 1.0 else 2 * steps
    raise ValueError(f"unknown solver {method!r}; expected 'euler' or 'heun'")


def _t_batch(t: float, z: torch.Tensor) -> torch.Tensor:
    return torch.full((z.shape[0],), t, dtype=time_dtype(z.dtype), device=z.device)


def _endpoint_step(z: torch.Tensor, z1_hat: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Euler step ``z + (t_next - t)·(z1_hat - z)/(1 - t)``; exactly ``z1_hat`` when ``t_next = 1``."""
    if t_next >= 1.0:
        return z1_hat
    return torch.lerp(z, z1_hat, (t_next - t) / (1.0 - t))


def _finish(
    z: torch.Tensor, traj: list[torch.Tensor] | None, return_trajectory: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if return_trajectory:
        assert traj is not None
        return z, torch.stack(traj)
    return z


@overload
def euler_endpoint(
    predict_endpoint: EndpointFn,
    z0: torch.Tensor,
    steps: int = ...,
    t0: float = ...,
    t1: float = ...,
    *,
    return_trajectory: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def euler_endpoint(
    predict_endpoint: EndpointFn,
    z0: torch.Tensor,
    steps: int = ...,
    t0: float = ...,
    t1: float = ...,
    *,
    return_trajectory: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
def euler_endpoint(
    predict_endpoint: EndpointFn,
    z0: torch.Tensor,
    steps: int = 1,
    t0: float = 0.0,
    t1: float = 1.0,
    *,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Explicit Euler on a uniform grid of ``steps`` steps from ``t0`` to ``t1``; NFE = ``steps``.

    ``z0`` is ``[B, ...]``. Returns the final state, and with ``return_trajectory=True`` also the states
    at every grid point stacked as ``[steps + 1, B, ...]``.
    """
    grid = time_grid(steps, t0, t1)
    z = z0
    traj = [z0] if return_trajectory else None
    for t, t_next in itertools.pairwise(grid):
        z = _endpoint_step(z, predict_endpoint(z, _t_batch(t, z)), t, t_next)
        if traj is not None:
            traj.append(z)
    return _finish(z, traj, return_trajectory)


@overload
def heun_endpoint(
    predict_endpoint: EndpointFn,
    z0: torch.Tensor,
    steps: int = ...,
    t0: float = ...,
    t1: float = ...,
    *,
    return_trajectory: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def heun_endpoint(
    predict_endpoint: EndpointFn,
    z0: torch.Tensor,
    steps: int = ...,
    t0: float = ...,
    t1: float = ...,
    *,
    return_trajectory: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
def heun_endpoint(
    predict_endpoint: EndpointFn,
    z0: torch.Tensor,
    steps: int = 1,
    t0: float = 0.0,
    t1: float = 1.0,
    *,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heun (explicit trapezoid, 2nd order) on a uniform grid; a final step ending at ``t = 1`` is Euler.

    With ``steps=1`` and ``t1=1`` this is the one-shot endpoint prediction. Same return convention as
    :func:`euler_endpoint`.
    """
    grid = time_grid(steps, t0, t1)
    z = z0
    traj = [z0] if return_trajectory else None
    for t, t_next in itertools.pairwise(grid):
        z1_hat = predict_endpoint(z, _t_batch(t, z))
        if t_next >= 1.0:
            z = z1_hat
        else:
            h = t_next - t
            v = (z1_hat - z) / (1.0 - t)
            z_pred = z + h * v
            v_next = (predict_endpoint(z_pred, _t_batch(t_next, z)) - z_pred) / (1.0 - t_next)
            z = z + (0.5 * h) * (v + v_next)
        if traj is not None:
            traj.append(z)
    return _finish(z, traj, return_trajectory)


def solve_endpoint(
    predict_endpoint: EndpointFn,
    z0: torch.Tensor,
    method: SolverMethod = "euler",
    steps: int = 1,
    t0: float = 0.0,
    t1: float = 1.0,
) -> torch.Tensor:
    """Config-friendly dispatcher over :func:`euler_endpoint` and :func:`heun_endpoint` (final state only)."""
    if method == "euler":
        return euler_endpoint(predict_endpoint, z0, steps, t0, t1)
    if method == "heun":
        return heun_endpoint(predict_endpoint, z0, steps, t0, t1)
    raise ValueError(f"unknown solver {method!r}; expected 'euler' or 'heun'")
