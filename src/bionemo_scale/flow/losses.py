"""Endpoint and set-level (distributional) losses.

Sets are ``[B, N, D]`` (batched) or ``[N, D]`` (one set); set losses return ``[B]`` (0-d for one set),
one value per set pair, so the caller chooses how to weight and reduce them. Two sets of a pair may
have different sizes (``N != M``). All distance arithmetic runs in at least float32 with autocast
disabled: under bf16 autocast the ``|a|² + |b|² - 2a·b`` expansion would lose every digit.

Reduced matmul precision: with ``torch.set_float32_matmul_precision("high")`` (TF32 on Ampere+ GPUs) or
``"medium"`` (bf16 products, also on AMX CPUs), float32 matmuls keep ~10 or ~7 mantissa bits and the
expansion's distances would carry ~1e-3 relative error or worse (geomloss has the same exposure). So
whenever the setting is not ``"highest"`` the default work dtype here is float64 (cheap at set sizes:
the cost is ``B·N·M·D`` FLOPs); ``compute_dtype`` still overrides it. Global flags are never toggled here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from bionemo_scale.matmul_precision import reduced_matmul_precision

__all__ = [
    "DEFAULT_RBF_BANDWIDTHS",
    "endpoint_mse",
    "energy_distance",
    "pairwise_distances",
    "pairwise_sq_distances",
    "rbf_mmd",
]

Reduction = Literal["mean", "sum", "none", "per_set"]

#: Default RBF bandwidths (σ in ``exp(-d²/2σ²)``), in the units of the data unless ``median_heuristic``.
DEFAULT_RBF_BANDWIDTHS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)

#: Floor on squared distances before the square root; equals geomloss's, so our energy distance matches it.
DISTANCE_EPS = 1e-8


def endpoint_mse(pred: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Squared error of the endpoint prediction; ``"mean"``/``"sum"``/``"none"`` as ``F.mse_loss``.

    ``"per_set"`` averages over everything but the leading (set) dimension and returns ``[B]``, for
    per-set weighting before the final reduction.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if reduction == "per_set":
        return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    return F.mse_loss(pred, target, reduction=reduction)


def _as_batched(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if x.ndim != y.ndim or x.ndim not in (2, 3):
        raise ValueError(f"sets must both be [N, D] or [B, N, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1] or (x.ndim == 3 and x.shape[0] != y.shape[0]):
        raise ValueError(f"sets must share batch size and feature dim, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim == 2:
        return x.unsqueeze(0), y.unsqueeze(0), True
    return x, y, False


def _work_dtype(*tensors: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    if compute_dtype is not None:
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
        return compute_dtype
    if reduced_matmul_precision() or any(t.dtype == torch.float64 for t in tensors):
        return torch.float64  # a float32 matmul may be TF32/bf16 inside: the expansion would lose the distances
    return torch.float32


def pairwise_sq_distances(
    x: torch.Tensor, y: torch.Tensor | None = None, *, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Squared Euclidean distances ``[..., N, M]`` between the rows of ``x`` and ``y`` (``y=None``: ``x``'s own).

    Uses the matmul expansion (memory ``N·M``, not ``N·M·D``) on centred inputs, which cuts the float32
    cancellation error, and clamps at 0. For self-distances (``y=None``) the diagonal is set to exactly
    0, so it carries neither rounding noise nor gradient; pass ``y=None`` rather than ``y=x`` for that.
    Computed in ``compute_dtype`` (default: float32; float64 if an input is float64 or the float32 matmul
    precision is reduced) with autocast off.
    In float32, points that coincide *across* ``x`` and ``y`` get ``d² ≈ ulp·|x|²`` rather than 0.
    """
    dtype = _work_dtype(x, compute_dtype=compute_dtype) if y is None else _work_dtype(x, y, compute_dtype=compute_dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        a = x.to(dtype)
        b = a if y is None else y.to(dtype)
        center = a.mean(-2, keepdim=True) if y is None else 0.5 * (a.mean(-2, keepdim=True) + b.mean(-2, keepdim=True))
        a = a - center
        b = a if y is None else b - center
        d2 = a.square().sum(-1).unsqueeze(-1) + b.square().sum(-1).unsqueeze(-2) - 2.0 * (a @ b.transpose(-1, -2))
        if y is None:
            eye = torch.eye(d2.shape[-1], dtype=torch.bool, device=d2.device)
            d2 = d2.masked_fill(eye, 0.0)
        return d2.clamp_min(0.0)


def pairwise_distances(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float = DISTANCE_EPS,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Euclidean distances ``sqrt(max(d², eps))``: finite gradient everywhere.

    ``d/dd² sqrt(d²)`` is infinite at 0, and coincident points (a set against itself, duplicated cells)
    are common; below the floor the clamp passes no gradient at all. With the default ``eps = 1e-8``
    coincident points are at distance ``1e-4``, exactly as in geomloss.
    """
    return pairwise_sq_distances(x, y, compute_dtype=compute_dtype).clamp_min(eps).sqrt()


def energy_distance(
    x: torch.Tensor, y: torch.Tensor, *, eps: float = DISTANCE_EPS, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Energy distance between the empirical measures of ``x`` ``[B, N, D]`` and ``y`` ``[B, M, D]``, ``[B]``.

    Defined as geomloss's ``SamplesLoss("energy")`` (the loss STATE trains with), i.e. **half** the
    textbook (Székely) energy distance::

        ED(x, y) = E||x - y|| - ½ E||x - x'|| - ½ E||y - y'||

    with uniform weights and all pairs, diagonal included (a V-statistic); ``||·||`` is
    :func:`pairwise_distances`, so coincident points count as ``sqrt(eps)``. Non-negative up to rounding,
    0 for identical sets up to rounding (in float32 ~1e-5, from points that coincide across the two sets:
    see :func:`pairwise_sq_distances`). Unbatched ``[N, D]`` inputs give a 0-d tensor. The result is float32
    (float64 for float64 inputs or ``compute_dtype``), whatever the input dtype.
    """
    xb, yb, unbatched = _as_batched(x, y)
    dxy = pairwise_distances(xb, yb, eps=eps, compute_dtype=compute_dtype).mean((-1, -2))
    dxx = pairwise_distances(xb, eps=eps, compute_dtype=compute_dtype).mean((-1, -2))
    dyy = pairwise_distances(yb, eps=eps, compute_dtype=compute_dtype).mean((-1, -2))
    out = dxy - 0.5 * (dxx + dyy)
    return out[0] if unbatched else out


def _median_distance(xb: torch.Tensor, yb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Median pairwise distance of the pooled sample, per set, ``[B, 1, 1]``, detached (the median heuristic)."""
    pooled = torch.cat([xb, yb], dim=-2).detach()
    d2 = pairwise_sq_distances(pooled, compute_dtype=dtype)
    n = pooled.shape[-2]
    off_diag = d2[:, ~torch.eye(n, dtype=torch.bool, device=d2.device)]
    return off_diag.median(dim=-1).values.clamp_min(1e-12).sqrt().reshape(-1, 1, 1)


def rbf_mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = DEFAULT_RBF_BANDWIDTHS,
    *,
    median_heuristic: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Squared MMD with a mixture of Gaussian kernels, per set pair ``[B]`` (0-d for one set).

    ``k(a, b) = mean_σ exp(-||a - b||² / (2σ²))`` over ``bandwidths`` (averaged, so ``k ∈ [0, 1]`` whatever
    the number of bandwidths). Biased V-statistic ``E k(x,x') + E k(y,y') - 2 E k(x,y)`` with the diagonal
    included: non-negative up to rounding, exactly the population MMD² of the two empirical measures, but
    biased upwards by O(1/N) against the underlying distributions. ``median_heuristic=True`` multiplies
    the bandwidths by the (detached) median pairwise distance of the pooled sets, making them unitless.
    ``compute_dtype`` as in :func:`energy_distance`.
    """
    if len(bandwidths) == 0 or any(s <= 0 for s in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths}")
    xb, yb, unbatched = _as_batched(x, y)
    dtype = _work_dtype(xb, yb, compute_dtype=compute_dtype)
    sigmas = torch.tensor(list(bandwidths), dtype=dtype, device=xb.device)
    if median_heuristic:
        sigmas = sigmas.reshape(1, 1, 1, -1) * _median_distance(xb, yb, dtype).unsqueeze(-1)  # [B, 1, 1, K]
    gamma = 1.0 / (2.0 * sigmas.square())

    def mean_kernel(d2: torch.Tensor) -> torch.Tensor:
        return torch.exp(-d2.unsqueeze(-1) * gamma).mean(-1).mean((-1, -2))

    with torch.autocast(device_type=xb.device.type, enabled=False):
        out = (
            mean_kernel(pairwise_sq_distances(xb, compute_dtype=dtype))
            + mean_kernel(pairwise_sq_distances(yb, compute_dtype=dtype))
            - 2.0 * mean_kernel(pairwise_sq_distances(xb, yb, compute_dtype=dtype))
        )
    return out[0] if unbatched else out
