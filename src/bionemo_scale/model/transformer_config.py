"""ScaleModelConfig (exposed, pydantic) -> megatron TransformerConfig (internal)."""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from bionemo_scale.config import ScaleModelConfig
from bionemo_scale.errors import ScaleError
from bionemo_scale.model.specs import make_transformer_config


def build_transformer_config(cfg: ScaleModelConfig, tp: int = 1, pp: int = 1) -> TransformerConfig:
    """Validate SCALE-specific widths, then derive megatron's config (shape errors are one line)."""
    if cfg.encoder_width % tp:
        raise ScaleError(
            f"encoder width {cfg.encoder_width} is not divisible by tensor_model_parallel_size {tp}",
            "set model.encoder_hidden_size to a multiple of the TP size",
        )
    return make_transformer_config(
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_attention_heads,
        cfg.ffn,
        tp,
        pp,
        fp8=cfg.fp8,
        fp8_recipe=cfg.fp8_recipe,
        params_dtype=cfg.params_dtype,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
    )
