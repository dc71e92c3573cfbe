"""The straight conditional path Z_t = (1-t)·Z0 + t·Z1 and its endpoint <-> velocity conversion.

Conventions shared by the whole ``flow`` package:

* Latent sets are ``[B, S, D]`` (batched) or ``[S, D]`` (a single set).
* A time ``t`` is a Python float, a 0-d tensor, a ``[B]`` tensor (one time per set) or any tensor whose
  dimensions are the *leading* dimensions of the data (e.g. ``[B, S]`` per cell); :func:`expand_time`
  right-pads it with singleton dimensions so it broadcasts.
* Time arithmetic runs in at least float32, even for bf16/fp16 data: in bf16 the value ``1 - 1e-4``
  rounds to ``1.0`` and ``1/(1-t)`` would divide by zero. Results are cast back to the data's dtype.
"""

from __future__ import annotations

import torch

__all__ = ["endpoint_to_velocity", "expand_time", "linear_path", "time_dtype", "velocity_to_endpoint"]

TimeLike = float | torch.Tensor


def time_dtype(data_dtype: torch.dtype) -> torch.dtype:
    """The dtype used for time arithmetic: float64 stays float64, everything else becomes float32."""
    return torch.float64 if data_dtype == torch.float64 else torch.float32


def expand_time(t: TimeLike, like: torch.Tensor) -> torch.Tensor:
    """Return ``t`` as a tensor on ``like.device`` that broadcasts against ``like``.

    ``t``'s dimensions are aligned with the *leading* dimensions of ``like`` (``[B]`` -> ``[B, 1, 1]``
    for ``like`` of shape ``[B, S, D]``), which is the opposite of PyTorch's trailing-dimension
    broadcasting and is why this helper exists. The dtype is at least float32 (see module docstring).
    """
    if isinstance(t, torch.Tensor):
        dtype = t.dtype if t.dtype == torch.float64 else time_dtype(like.dtype)
        t = t.to(device=like.device, dtype=dtype)
    else:
        t = torch.tensor(float(t), device=like.device, dtype=time_dtype(like.dtype))
    if t.ndim > like.ndim:
        raise ValueError(
            f"time has {t.ndim} dims but the data only {like.ndim} (t {tuple(t.shape)}, data {tuple(like.shape)})"
        )
    if any(n not in (1, m) for n, m in zip(t.shape, like.shape)):
        raise ValueError(
            f"time shape {tuple(t.shape)} must match (or be 1 on) the leading dims of the data {tuple(like.shape)} "
            "(a [B] time goes with [B, S, D] data; use a float or 0-d tensor for one unbatched set)"
        )
    return t.reshape(*t.shape, *([1] * (like.ndim - t.ndim)))


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def linear_path(z0: torch.Tensor, z1: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Point on the straight path, ``(1-t)·z0 + t·z1``.

    Written as a two-sided blend (not ``z0 + t·(z1-z0)``) so that ``t=0`` gives ``z0`` and ``t=1`` gives
    ``z1`` bit-exactly.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    tt = expand_time(t, z0)
    return ((1.0 - tt) * z0 + tt * z1).to(_out_dtype(z0, z1))


def endpoint_to_velocity(z1_hat: torch.Tensor, zt: torch.Tensor, t: TimeLike, eps: float = 1e-4) -> torch.Tensor:
    """Velocity implied by an endpoint prediction on a straight path: ``(z1_hat - zt) / (1 - t)``.

    ``t`` is clamped to ``<= 1 - eps`` because the ratio is 0/0 at ``t = 1``; the solvers never evaluate
    there, this clamp only protects direct callers (e.g. a velocity-space loss sampled at ``t≈1``).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    tt = expand_time(t, zt).clamp(max=1.0 - eps)
    return ((z1_hat - zt) / (1.0 - tt)).to(_out_dtype(z1_hat, zt))


def velocity_to_endpoint(v: torch.Tensor, zt: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Inverse of :func:`endpoint_to_velocity`: ``zt + (1 - t)·v`` (well defined for every ``t``)."""
    tt = expand_time(t, zt)
    return (zt + (1.0 - tt) * v).to(_out_dtype(v, zt))
