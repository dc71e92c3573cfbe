"""Named recipes: typed functions that return a complete, validated `ScaleConfig`.

They are registered under the entry-point group `bionemo.recipes` (see pyproject.toml), so a
BioNeMo launcher finds them with `importlib.metadata.entry_points(group="bionemo.recipes")`
without importing this package by hand.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

from bionemo_scale.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FlowConfig,
    OptimConfig,
    SamplerConfig,
    ScaleConfig,
    ScaleModelConfig,
    TrainerConfig,
)
from bionemo_scale.errors import ScaleError

ENTRY_POINT_GROUP = "bionemo.recipes"

Recipe = Callable[[], ScaleConfig]


def tiny_cpu() -> ScaleConfig:
    """The demo: a small model that trains on the bundled data in minutes on 2 CPU cores."""
    return ScaleConfig(
        name="tiny_cpu",
        data=DataConfig(sampler=SamplerConfig(set_size=32, control_matching="batch"), micro_batch_size=8),
        model=ScaleModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, encoder_hidden_size=128),
        flow=FlowConfig(distribution_weight=0.1),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20),
        trainer=TrainerConfig(max_steps=300, val_check_interval=100, log_every_n_steps=10, accelerator="cpu"),
        checkpoint=CheckpointConfig(every_n_train_steps=100, monitor="val_loss", mode="min"),
        eval=EvalConfig(profile="fast", steps=1),
    )


def norman_demo() -> ScaleConfig:
    """Norman19 K562 combinations (+ glioma lines): a model sized for a workstation CPU or one GPU."""
    return ScaleConfig(
        name="norman_demo",
        data=DataConfig(sampler=SamplerConfig(set_size=64), micro_batch_size=8),
        model=ScaleModelConfig(hidden_size=128, num_layers=4, num_attention_heads=8),
        optim=OptimConfig(lr=5e-4, min_lr=5e-5, warmup_steps=50),
        trainer=TrainerConfig(max_steps=1500, val_check_interval=250, log_every_n_steps=25),
        checkpoint=CheckpointConfig(every_n_train_steps=250, monitor="val/pearson_delta", mode="max"),
        eval=EvalConfig(profile="fast"),
    )


def tahoe_100m_pretrain() -> ScaleConfig:
    """Atlas-scale pretraining on Tahoe-100M: a ~1.3B-parameter encoder on 8×H100 nodes.

    TP=4 shards heads, MLPs and the gene encoder/decoder inside a node (NVLink); PP=2 splits
    the 24 layers; DP spans the rest. Transformer Engine spec with FP8 (hybrid, delayed
    scaling), bf16 elsewhere. Sets of 251 cells (with the 5 condition tokens, 256 tokens per set:
    FP8 GEMMs need a multiple of 8), 2,000 HVGs. Not runnable on CPU.
    """
    return ScaleConfig(
        name="tahoe_100m_pretrain",
        data=DataConfig(
            sampler=SamplerConfig(set_size=251, control_matching="batch", epoch_mode="cells"),
            micro_batch_size=4,
            global_batch_size=512,
            num_workers=4,
        ),
        model=ScaleModelConfig(
            hidden_size=2048,
            num_layers=24,
            num_attention_heads=16,
            ffn_hidden_size=5504,
            encoder_hidden_size=4096,
            spec="te",
            fp8="hybrid",
            fp8_recipe="delayed",
            params_dtype="bfloat16",
        ),
        optim=OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=2000, weight_decay=0.05),
        trainer=TrainerConfig(
            max_steps=200_000,
            val_check_interval=2000,
            limit_val_batches=50,
            log_every_n_steps=50,
            accelerator="gpu",
            devices=8,
            num_nodes=16,
            tensor_model_parallel_size=4,
            pipeline_model_parallel_size=2,
            precision="bf16-mixed",
            deterministic=False,
        ),
        checkpoint=CheckpointConfig(every_n_train_steps=2000, save_top_k=3, monitor="val/pearson_delta", mode="max"),
        eval=EvalConfig(profile="fast", max_pairs=256),
    )


def finetune() -> ScaleConfig:
    """Fine-tune a released checkpoint on a new screen: low LR, short schedule, same architecture.

    Set `init_from` (or pass `bionemo-scale finetune --from RELEASE`); the architecture is taken
    from the release, and vocabularies are extended for new perturbations/contexts/batches.
    """
    base = tiny_cpu()
    return base.model_copy(
        update={
            "name": "finetune",
            "optim": OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=10),
            "trainer": base.trainer.model_copy(update={"max_steps": 150, "val_check_interval": 50}),
        }
    )


BUILTIN: dict[str, Recipe] = {
    "tiny_cpu": tiny_cpu,
    "norman_demo": norman_demo,
    "tahoe_100m_pretrain": tahoe_100m_pretrain,
    "finetune": finetune,
}


def registered() -> dict[str, Recipe]:
    """Recipes visible through the `bionemo.recipes` entry points (ours and other plugins')."""
    found: dict[str, Recipe] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load()
    return found or dict(BUILTIN)


def get_recipe(name: str) -> ScaleConfig:
    recipes = {**BUILTIN, **registered()}
    if name not in recipes:
        raise ScaleError(f"unknown recipe '{name}'", f"use one of {sorted(recipes)} (bionemo-scale recipe list)")
    return recipes[name]()
