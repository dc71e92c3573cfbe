"""Bidirectional LLaMA-style layer specs and the megatron TransformerConfig for SCALE.

The set network attends from every cell token to every cell and condition token: no causal
mask (`AttnMaskType.no_mask`) and no positional encoding, so the block is permutation
equivariant over the set. Layers are pre-norm RMSNorm → self-attention → RMSNorm → SwiGLU MLP,
without biases.

Two specs build the same network:
- `local`: megatron-core's own modules (DotProductAttention, Column/RowParallelLinear, torch
  RMSNorm); runs anywhere, CPU included.
- `te`: Transformer Engine modules (norm fused into the QKV/FC1 GEMMs, FP8 capable); GPU only.
The local spec maps its norm weights onto the TE names in distributed checkpoints
(`sharded_state_dict_keys_map`), so a checkpoint moves between the two.

megatron is imported inside the functions: validating a config costs no megatron import.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import torch

from bionemo_scale.errors import ScaleError

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

logger = logging.getLogger(__name__)

SpecKind = Literal["te", "local"]
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_bidirectional_layer_spec() -> ModuleSpec:
    """A bidirectional pre-norm RMSNorm/SwiGLU layer from megatron-core's local modules.

    RMSNorm is `torch.nn.RMSNorm`, as megatron's `WrappedTorchNorm` builds it (apex's
    FusedLayerNorm has no RMSNorm and no CPU path), but normalising in float32 under bf16 autocast
    (`model/autocast.py`). Its weights keep `WrappedTorchNorm`'s names, so checkpoints are unchanged.
    SwiGLU and the absence of biases are set in the TransformerConfig (`make_transformer_config`).
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from bionemo_scale.model.autocast import Float32RMSNorm

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Float32RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Float32RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Save the separate norms under TE's fused names: checkpoints load into either spec.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def te_bidirectional_layer_spec() -> ModuleSpec:
    """The same layer from Transformer Engine modules (fused norm+GEMM, FP8), as megatron's
    `get_gpt_layer_with_transformer_engine_spec` builds it, but with `no_mask`."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )
    except ImportError as exc:
        raise ScaleError(
            f"the 'te' layer spec needs NVIDIA Transformer Engine, which cannot be imported ({exc})",
            "use model.spec=local (CPU and any GPU), or install the gpu extra "
            "(pip install 'bionemo-scale[gpu]') or run in the NGC PyTorch/NeMo container",
        ) from None
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            # RMSNorm is fused into linear_qkv / linear_fc1 (TELayerNormColumnParallelLinear).
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_layer_spec(kind: SpecKind) -> ModuleSpec:
    """The bidirectional layer spec for `kind` ("te" on GPU, "local" anywhere)."""
    if kind == "local":
        spec = local_bidirectional_layer_spec()
    elif kind == "te":
        spec = te_bidirectional_layer_spec()
    else:
        raise ScaleError(f"unknown layer spec {kind!r}", "use model.spec=local or model.spec=te")
    logger.info("transformer layer spec: %s (bidirectional, no positional encoding)", kind)
    return spec


def get_block_spec(config, kind: SpecKind) -> ModuleSpec:
    """The block's spec: `kind`'s layer for every layer this pipeline stage builds, and its final norm.

    For "te", megatron picks the final norm (TE's). For "local" the final norm is our
    `Float32RMSNorm`, like the layers' norms: megatron's default there is a plain torch RMSNorm,
    which under bf16 autocast would get a bf16 input with float32 weights. The weight's name
    (`decoder.final_layernorm.weight`) is the same either way.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from bionemo_scale.model.autocast import Float32RMSNorm

    layer = get_layer_spec(kind)
    if kind != "local":
        return layer
    layers = [layer] * get_num_layers_to_build(config)
    return ModuleSpec(
        module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=Float32RMSNorm)
    )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ScaleError(f"unknown params_dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def validate_transformer_shape(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    ffn_hidden_size: int,
    tp: int = 1,
    pp: int = 1,
    num_query_groups: int | None = None,
) -> None:
    """Raise a one-line ScaleError for a shape megatron would reject (or mis-shard) under TP/PP."""
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("ffn_hidden_size", ffn_hidden_size),
        ("tensor_model_parallel_size", tp),
        ("pipeline_model_parallel_size", pp),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScaleError(f"{name} must be a positive integer (got {value!r})", f"set {name} >= 1")
    groups = num_heads if num_query_groups is None else num_query_groups
    checks = [
        (hidden_size % num_heads, f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}"),
        (num_heads % tp, f"num_heads {num_heads} is not divisible by tensor_model_parallel_size {tp}"),
        (num_heads % groups, f"num_heads {num_heads} is not divisible by num_query_groups {groups}"),
        (groups % tp, f"num_query_groups {groups} is not divisible by tensor_model_parallel_size {tp}"),
        (
            ffn_hidden_size % tp,
            f"ffn_hidden_size {ffn_hidden_size} is not divisible by tensor_model_parallel_size {tp}",
        ),
        (num_layers % pp, f"num_layers {num_layers} is not divisible by pipeline_model_parallel_size {pp}"),
    ]
    for bad, problem in checks:
        if bad:
            raise ScaleError(problem, "change the model shape or the TP/PP sizes")


def make_transformer_config(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    ffn_hidden_size: int,
    tp: int = 1,
    pp: int = 1,
    *,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    params_dtype: torch.dtype | str = torch.float32,
    device_is_cpu: bool | None = None,
    num_query_groups: int | None = None,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    init_method_std: float = 0.02,
    layernorm_epsilon: float = 1e-5,
    **overrides: Any,
) -> TransformerConfig:
    """megatron TransformerConfig for the bidirectional RMSNorm/SwiGLU/no-bias backbone.

    Shape, TP/PP and FP8 problems raise a one-line ScaleError before megatron is imported.
    On CPU the config gets `cpu_safe_transformer_kwargs` (host initialisation, no fused
    kernels); `overrides` are extra TransformerConfig fields applied last (e.g. recompute).
    """
    validate_transformer_shape(hidden_size, num_layers, num_heads, ffn_hidden_size, tp, pp, num_query_groups)
    dtype = _as_dtype(params_dtype)
    if device_is_cpu is None:
        device_is_cpu = not torch.cuda.is_available()
    if fp8 is not None:
        if fp8 not in FP8_FORMATS:
            raise ScaleError(f"unknown fp8 format {fp8!r}", f"use one of {', '.join(FP8_FORMATS)} or leave fp8 unset")
        if fp8_recipe not in FP8_RECIPES:
            raise ScaleError(f"unknown fp8_recipe {fp8_recipe!r}", f"use one of {', '.join(FP8_RECIPES)}")
        if device_is_cpu:
            raise ScaleError("fp8 needs a CUDA GPU with Transformer Engine", "leave fp8 unset for CPU runs")

    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from bionemo_scale.parallel import cpu_safe_transformer_kwargs

    kwargs: dict[str, Any] = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_heads,
        "num_query_groups": num_query_groups,
        "ffn_hidden_size": ffn_hidden_size,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "normalization": "RMSNorm",
        "layernorm_epsilon": layernorm_epsilon,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": hidden_dropout,
        "attention_dropout": attention_dropout,
        "init_method_std": init_method_std,
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "fp8": fp8,
        "fp8_recipe": fp8_recipe,
    }
    if pp > 1:
        kwargs["pipeline_dtype"] = dtype
    if device_is_cpu:
        kwargs.update(cpu_safe_transformer_kwargs(pp, dtype))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
