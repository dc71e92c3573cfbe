"""Small building blocks: a tensor-parallel MLP and a sinusoidal time embedding.

The gene encoder/decoder are the only layers whose width scales with the gene panel (up to
~20k genes), so they use megatron's column→row parallel pair and shard under TP exactly like
a transformer MLP: the wide weight is split, the output is all-reduced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class ParallelMLP(MegatronModule):
    """in → width (column-parallel) → SiLU → out (row-parallel), no biases.

    A MegatronModule, not a plain nn.Module: megatron's default sharded_state_dict treats the
    children of plain modules as replicated, which would checkpoint only one TP shard.
    """

    def __init__(self, config: TransformerConfig, in_features: int, width: int, out_features: int) -> None:
        super().__init__(config=config)
        self.fc_in = tensor_parallel.ColumnParallelLinear(
            in_features, width, config=config, init_method=config.init_method, bias=False, gather_output=False
        )
        self.fc_out = tensor_parallel.RowParallelLinear(
            width,
            out_features,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc_in(x)
        out, _ = self.fc_out(F.silu(h))
        return out


def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """[B] times in [0, 1] -> [B, dim] sin/cos features (scaled so t=1 spans many periods)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * max_period)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
