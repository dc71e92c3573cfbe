"""bf16 autocast for the forward pass (`trainer.autocast=bf16`): float32 weights, bf16 matmuls.

Megatron's own bf16 (`trainer.precision=bf16-mixed`) keeps the weights in bf16 with float32 main
gradients, and its optimizer wraps only CUDA parameters, so it cannot train on a CPU. torch's
autocast keeps every weight, gradient and optimizer state in float32 and runs the matrix
products of the forward (and so of the backward) in bf16. On CPUs with AVX512-BF16 or AMX that
is 2-4x faster per GEMM than float32; on a GPU it is the usual bf16 mixed precision.

What stays float32 under it, and why:
- RMSNorm (`Float32RMSNorm`): statistics over the hidden width lose digits in bf16, and torch's
  fused kernel refuses a bf16 input with a float32 weight (it falls back to a slow path);
- what the model returns (`outputs_to_float32`): the losses and the pipeline's activations are
  float32, so no term is reduced in bf16 and the stages exchange the dtype their buffers expect;
- the set distances and OT costs, which turn autocast off themselves (`flow/losses.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal, TypeVar, get_args

import torch

Autocast = Literal["off", "bf16"]
AUTOCAST_MODES: tuple[str, ...] = get_args(Autocast)

T = TypeVar("T")


def forward_autocast(mode: Autocast | str, device_type: str) -> contextlib.AbstractContextManager:
    """The context the model's forward runs in: bf16 autocast on `device_type`, or nothing."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def outputs_to_float32(out: T) -> T:
    """`out` (a tensor or a dataclass of tensors) with every floating tensor in float32."""
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        changes = {
            f.name: outputs_to_float32(getattr(out, f.name))
            for f in dataclasses.fields(out)
            if torch.is_tensor(getattr(out, f.name))
        }
        return dataclasses.replace(out, **changes)
    return out


class Float32RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm that normalises in float32 when its input is lower precision than its weight.

    With float32 inputs (no autocast) it is exactly `torch.nn.RMSNorm`; under bf16 params
    (megatron's `Float16Module`) input and weight are both bf16 and nothing changes either. Its
    constructor takes megatron's norm arguments (those of `WrappedTorchNorm`), so a layer spec can
    name it directly. The local spec's only norm is RMSNorm (`make_transformer_config` sets it).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"Float32RMSNorm builds RMSNorm only, not {config.normalization!r}")
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.dtype == torch.float32 and x.dtype != torch.float32:
            x = x.float()
        return super().forward(x)
