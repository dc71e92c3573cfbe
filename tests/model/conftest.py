"""Single-process megatron state for model tests (gloo, world of one, CPU shim)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron_single():
    from bionemo_scale.parallel import init_distributed

    return init_distributed(1, 1, seed=5)


def tiny_model(**overrides):
    from bionemo_scale.config import ScaleModelConfig
    from bionemo_scale.model.scale_model import ScaleModel
    from bionemo_scale.model.transformer_config import build_transformer_config

    fields = dict(
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=64,
        n_genes=20,
        n_parts=4,
        n_contexts=3,
        n_batches=2,
        additive_prior=False,
    )
    fields.update(overrides)
    cfg = ScaleModelConfig(**fields)
    return ScaleModel(build_transformer_config(cfg), cfg), cfg
