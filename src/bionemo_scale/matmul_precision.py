"""The float32 matmul precision a job runs at (`trainer.matmul_precision`, `predict --matmul-precision`).

torch's global setting decides whether float32 matrix products may use reduced internal precision:
'high' lets Ampere+ GPUs use TF32, and 'medium' lets GPUs and CPUs with AMX/AVX512-BF16 (through
oneDNN) use bf16 products with float32 accumulation. It is process-global, so a job sets it for its
own duration and puts the caller's value back. Arithmetic that needs every digit asks
`reduced_matmul_precision()` and runs in float64 instead (the set distances of `flow/losses.py`;
the OT costs of `flow/coupling.py` are float64 always).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch

MatmulPrecision = Literal["highest", "high", "medium"]
PRECISIONS: tuple[str, ...] = get_args(MatmulPrecision)


def reduced_matmul_precision() -> bool:
    """True when float32 matmuls may run below full float32 precision (TF32 or bf16 inside)."""
    return torch.get_float32_matmul_precision() != "highest"


@contextlib.contextmanager
def float32_matmul_precision(precision: MatmulPrecision | str) -> Iterator[None]:
    """Run the block at `precision`, then restore the process's previous setting."""
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision must be one of {PRECISIONS}, got {precision!r}")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
