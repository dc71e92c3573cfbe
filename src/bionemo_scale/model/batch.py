"""Per-batch flow preparation: coupling, flow time and condition dropout.

Everything random here is a pure function of (seed, sample index), never of a stateful RNG:
every pipeline stage, tensor-parallel rank and resumed run computes the same t, the same
coupling and the same dropout mask for the same sample without communicating.
"""

from __future__ import annotations

import numpy as np
import torch

from bionemo_scale.config import FlowConfig
from bionemo_scale.flow.coupling import apply_coupling, couple

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

STREAM_TIME = 1
STREAM_CONTEXT_DROPOUT = 2
STREAM_PERT_DROPOUT = 3
STREAM_PRIOR_SELF = 4


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hashed_uniform(sample_index: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """A uniform in [0, 1) per sample, determined by (seed, stream, sample index) alone."""
    idx = sample_index.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(1_000_003) + np.uint64(stream))
        z = _splitmix64(idx ^ key)
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return torch.from_numpy(u.astype(np.float32)).to(sample_index.device)


def flow_time(u: torch.Tensor, kind: str) -> torch.Tensor:
    """Uniform or logit-normal(0, 1) time from a uniform variate (inverse CDF)."""
    if kind == "uniform":
        return u
    if kind == "logit_normal":
        return torch.sigmoid(torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6)))
    raise ValueError(f"unknown time sampler {kind!r}")


def prepare_flow_batch(
    batch: dict[str, torch.Tensor],
    flow: FlowConfig,
    seed: int,
    *,
    context_dropout: float = 0.0,
    unknown_context: int | None = None,
    pert_dropout: float = 0.0,
    unknown_part: int | None = None,
    prior_self_rate: float = 0.0,
    training: bool = True,
) -> dict[str, torch.Tensor]:
    """Add `t`, couple `pert` to `ctrl` inside each set, and drop condition ids.

    Context dropout trains the unknown-context token (zero-shot contexts). Perturbation dropout
    replaces the perturbation's part ids by the unknown part, so the model must predict from the
    additive prior and the context alone: what carries over to pairs it never saw.

    Prior self-cover (`prior_self` / `prior_self_ok` in the batch) swaps a set's prior for its own
    training shift and drops all its parts: the model learns that a prior covering every part is
    the answer, which is what a combination whose singles were seen in-context gets at prediction.
    """
    out = {k: v for k, v in batch.items() if k not in ("prior_self", "prior_self_ok")}
    index = batch["index"]
    if training:
        out["t"] = flow_time(hashed_uniform(index, seed, STREAM_TIME), flow.time_sampler)
        if "pert" in batch:
            perm = couple(batch["ctrl"], batch["pert"], method=flow.coupling)
            out["pert"] = apply_coupling(batch["pert"], perm)
        if context_dropout > 0 and unknown_context is not None:
            drop = hashed_uniform(index, seed, STREAM_CONTEXT_DROPOUT) < context_dropout
            out["context_id"] = torch.where(
                drop, torch.full_like(batch["context_id"], unknown_context), batch["context_id"]
            )
        if pert_dropout > 0 and unknown_part is not None:
            drop = hashed_uniform(index, seed, STREAM_PERT_DROPOUT) < pert_dropout
            parts = batch["parts"]
            out["parts"] = torch.where(drop[:, None] & (parts >= 0), torch.full_like(parts, unknown_part), parts)
        if prior_self_rate > 0 and "prior_self" in batch and "prior" in batch:
            swap = (hashed_uniform(index, seed, STREAM_PRIOR_SELF) < prior_self_rate) & batch["prior_self_ok"]
            out["prior"] = torch.where(swap[:, None], batch["prior_self"].to(batch["prior"].dtype), batch["prior"])
            out["parts"] = torch.where(swap[:, None], torch.full_like(out["parts"], -1), out["parts"])
    else:
        out["t"] = torch.zeros(index.shape[0], dtype=torch.float32, device=index.device)
    return out
