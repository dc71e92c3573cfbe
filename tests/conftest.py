"""Shared pytest configuration: marker gating and small fixtures.

GPU/FP8 tests are *skipped with a reason* only when the hardware or Transformer Engine is
absent; they never skip to hide a failure on a machine that has them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = Path(os.environ.get("BIONEMO_SCALE_BENCH_PYTHON", REPO_ROOT / ".venv-bench" / "bin" / "python"))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


def _fp8_capable_gpu() -> bool:
    """FP8 (Transformer Engine's hybrid recipe) needs compute capability 8.9+ (Ada, Hopper)."""
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    except Exception:  # pragma: no cover
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _cuda_available()
    has_te = importlib.util.find_spec("transformer_engine") is not None
    has_bench = BENCH_PYTHON.exists()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)"))
        if "fp8" in item.keywords and not (has_te and _fp8_capable_gpu()):
            item.add_marker(
                pytest.mark.skip(reason="needs Transformer Engine and an FP8-capable GPU (compute capability 8.9+)")
            )
        if "bench_env" in item.keywords and not has_bench:
            item.add_marker(
                pytest.mark.skip(reason=f"needs the comparison venv at {BENCH_PYTHON} (run `make bench-venv`)")
            )


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
