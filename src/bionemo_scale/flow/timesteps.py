"""Training-time samplers for the flow time ``t`` (named ``timesteps`` so it does not shadow stdlib ``time``)."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["TimeDistribution", "sample_time", "time_grid"]

TimeDistribution = Literal["uniform", "logit_normal"]


def sample_time(
    n: int,
    kind: TimeDistribution = "uniform",
    *,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``n`` times in ``[0, 1)``.

    * ``"uniform"``: ``U[0, 1)``.
    * ``"logit_normal"``: ``sigmoid(N(mean, std²))`` (SD3-style), which concentrates training on the
      middle of the path where endpoint prediction is hardest; its median is ``sigmoid(mean)``.

    Sampling happens in float32 (float64 if asked) and is then cast; values that round up to 1 in a low
    precision ``dtype`` are clamped to the largest value below 1, so ``1/(1-t)`` stays finite.
    Deterministic given ``generator`` (whose device must match ``device``).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device, dtype=work)
    elif kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device, dtype=work))
    else:
        raise ValueError(f"unknown time distribution {kind!r}; expected 'uniform' or 'logit_normal'")
    t = t.to(dtype)
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)).to(t.device)
    return torch.minimum(t, below_one)


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0) -> list[float]:
    """Uniform grid of ``steps + 1`` Python floats from ``t0`` to ``t1``, with both ends exact."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
    grid = [t0 + (t1 - t0) * k / steps for k in range(steps + 1)]
    grid[0], grid[-1] = t0, t1
    return grid
