"""bionemo_scale.model.specs: config validation, the local and TE bidirectional layer specs."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bionemo_scale.errors import ScaleError
from bionemo_scale.model import specs

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ({"hidden_size": 66}, "hidden_size 66 is not divisible by num_heads 4"),
        ({"tp": 3}, "num_heads 4 is not divisible by tensor_model_parallel_size 3"),
        ({"pp": 3}, "num_layers 4 is not divisible by pipeline_model_parallel_size 3"),
        ({"ffn_hidden_size": 130, "tp": 4}, "ffn_hidden_size 130 is not divisible by tensor_model_parallel_size 4"),
        ({"num_query_groups": 3}, "num_heads 4 is not divisible by num_query_groups 3"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
    ],
)
def test_bad_shapes_are_one_line_errors(shape: dict, match: str) -> None:
    args = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "ffn_hidden_size": 128} | shape
    with pytest.raises(ScaleError, match=match) as info:
        specs.make_transformer_config(**args)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_validation_does_not_import_megatron() -> None:
    """Shape errors are raised before megatron is touched (cheap config validation)."""
    code = (
        "import sys\n"
        "from bionemo_scale.model.specs import make_transformer_config\n"
        "try:\n    make_transformer_config(66, 2, 4, 128)\nexcept ValueError as e:\n    print(e)\n"
        "print('megatron' in sys.modules)\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False") and "not divisible by num_heads" in out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fp8": "e5m2"}, "unknown fp8 format 'e5m2'"),
        ({"fp8": "hybrid", "fp8_recipe": "fancy"}, "unknown fp8_recipe 'fancy'"),
        ({"fp8": "hybrid", "device_is_cpu": True}, "fp8 needs a CUDA GPU with Transformer Engine"),
        ({"params_dtype": "float64"}, "unknown params_dtype 'float64'"),
    ],
)
def test_bad_precision_is_an_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ScaleError, match=match):
        specs.make_transformer_config(64, 2, 4, 128, **kwargs)


def test_transformer_config_is_llama_style_and_cpu_safe() -> None:
    config = specs.make_transformer_config(64, 4, 4, 128, 2, 2, params_dtype="bfloat16", device_is_cpu=True)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and config.activation_func is F.silu
    assert not config.add_bias_linear and not config.add_qkv_bias
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (2, 2)
    assert config.params_dtype is torch.bfloat16 and config.bf16 and config.pipeline_dtype is torch.bfloat16
    assert config.use_cpu_initialization and not config.gradient_accumulation_fusion
    assert not (config.bias_dropout_fusion or config.masked_softmax_fusion or config.persist_layer_norm)
    assert config.fp8 is None


def test_gpu_config_passes_fp8_through() -> None:
    config = specs.make_transformer_config(
        64, 2, 4, 128, fp8="hybrid", fp8_recipe="tensorwise", device_is_cpu=False, hidden_dropout=0.1
    )
    assert (config.fp8, config.fp8_recipe, config.hidden_dropout) == ("hybrid", "tensorwise", 0.1)
    assert not config.use_cpu_initialization


def test_local_spec_is_bidirectional_rmsnorm_swiglu() -> None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP

    from bionemo_scale.model.autocast import Float32RMSNorm

    sub = specs.get_layer_spec("local").submodules
    attn = sub.self_attention
    assert attn.params == {"attn_mask_type": AttnMaskType.no_mask}
    assert attn.submodules.core_attention is DotProductAttention
    assert (attn.submodules.linear_qkv, attn.submodules.linear_proj) == (ColumnParallelLinear, RowParallelLinear)
    assert sub.input_layernorm is Float32RMSNorm and sub.pre_mlp_layernorm is Float32RMSNorm  # torch's RMSNorm
    assert sub.mlp.module is MLP
    assert (sub.mlp.submodules.linear_fc1, sub.mlp.submodules.linear_fc2) == (ColumnParallelLinear, RowParallelLinear)


def test_get_layer_spec_logs_the_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bionemo_scale.model.specs"):
        specs.get_layer_spec("local")
    assert "layer spec: local" in caplog.text


def test_unknown_spec_is_an_error() -> None:
    with pytest.raises(ScaleError, match="unknown layer spec 'tex'"):
        specs.get_layer_spec("tex")  # type: ignore[arg-type]


@pytest.mark.skipif(HAS_TE, reason="Transformer Engine is installed")
def test_te_spec_without_te_names_the_fix() -> None:
    with pytest.raises(ScaleError, match="Transformer Engine") as info:
        specs.get_layer_spec("te")
    assert "spec=local" in str(info.value) and "NGC" in str(info.value)


def test_te_spec_wiring_with_stand_in_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TE spec's structure, checked on CPU with stand-ins for the TE classes."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp

    fake = types.ModuleType("megatron.core.extensions.transformer_engine")
    for name in ("TEDotProductAttention", "TELayerNormColumnParallelLinear", "TERowParallelLinear"):
        setattr(fake, name, type(name, (), {}))
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "megatron.core.extensions.transformer_engine", fake)

    sub = specs.get_layer_spec("te").submodules
    attn = sub.self_attention
    assert attn.params == {"attn_mask_type": AttnMaskType.no_mask}
    assert attn.submodules.core_attention is fake.TEDotProductAttention
    assert attn.submodules.linear_qkv is fake.TELayerNormColumnParallelLinear  # RMSNorm fused in
    assert attn.submodules.linear_proj is fake.TERowParallelLinear
    assert sub.mlp.submodules.linear_fc1 is fake.TELayerNormColumnParallelLinear
    assert sub.mlp.submodules.linear_fc2 is fake.TERowParallelLinear
    assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp
