"""Tests for the training-time samplers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bionemo_scale.flow.timesteps import sample_time, time_grid


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_sample_time_shape_range_dtype(kind: str) -> None:
    t = sample_time(4096, kind, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    assert t.shape == (4096,)
    assert t.dtype == torch.float32
    assert (t >= 0).all() and (t < 1).all()
    assert t.std() > 0.1  # not collapsed


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_sample_time_deterministic_given_generator(kind: str) -> None:
    a = sample_time(64, kind, generator=torch.Generator().manual_seed(7))  # type: ignore[arg-type]
    b = sample_time(64, kind, generator=torch.Generator().manual_seed(7))  # type: ignore[arg-type]
    c = sample_time(64, kind, generator=torch.Generator().manual_seed(8))  # type: ignore[arg-type]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("mean", [-1.0, 0.0, 0.5])
def test_logit_normal_median_is_sigmoid_mean(mean: float) -> None:
    t = sample_time(20000, "logit_normal", generator=torch.Generator().manual_seed(0), mean=mean, std=1.0)
    assert abs(t.median().item() - 1.0 / (1.0 + math.exp(-mean))) < 0.01


def test_logit_normal_std_controls_spread() -> None:
    g = torch.Generator().manual_seed(0)
    narrow = sample_time(5000, "logit_normal", generator=g, std=0.3)
    wide = sample_time(5000, "logit_normal", generator=g, std=2.0)
    assert narrow.std() < wide.std()


def test_uniform_mean_is_half() -> None:
    t = sample_time(20000, generator=torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sample_time_never_reaches_one(dtype: torch.dtype) -> None:
    # sigmoid(30) rounds to 1.0 in float32; the sampler must clamp it below 1.
    t = sample_time(256, "logit_normal", mean=30.0, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert t.dtype == dtype
    assert (t < 1).all()


def test_sample_time_float64_and_errors() -> None:
    assert sample_time(3, dtype=torch.float64).dtype == torch.float64
    assert sample_time(0).shape == (0,)
    with pytest.raises(ValueError, match="unknown"):
        sample_time(3, "beta")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std"):
        sample_time(3, "logit_normal", std=0.0)
    with pytest.raises(ValueError, match="n must"):
        sample_time(-1)


def test_time_grid_is_uniform_with_exact_ends() -> None:
    grid = time_grid(7, 0.3, 1.0)
    assert len(grid) == 8
    assert grid[0] == 0.3 and grid[-1] == 1.0
    steps = [b - a for a, b in itertools.pairwise(grid)]
    assert max(steps) - min(steps) < 1e-12
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="t0"):
        time_grid(2, 0.5, 0.5)
