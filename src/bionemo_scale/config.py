"""Pydantic configs: the exposed, validated surface of every job, with YAML in and out.

Internal megatron `TransformerConfig`s are *derived* from these (see `model/`), following
BioNeMo's split between user-facing config and engine config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bionemo_scale.errors import ScaleError


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a recipe must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(StrictModel):
    """How an h5ad becomes an SCDL perturbation dataset."""

    pert_col: str
    control: str
    context_col: str
    batch_col: str | None = None
    dose_col: str | None = None
    split_col: str | None = None
    split: str | None = Field(None, description="TOML split; restricts HVG selection to training cells")
    hvg: int | None = Field(None, ge=1, description="keep the N most highly variable genes")
    keep_obs: list[str] = Field(default_factory=list)
    combo_sep: str = "+"
    target_sum: float = Field(1e4, gt=0)
    chunk_rows: int = Field(20_000, ge=1)
    matrix_key: str = "X"
    dataset_name: str | None = None


class SamplerConfig(StrictModel):
    """How set pairs are drawn from a processed dataset."""

    set_size: int = Field(64, description="cells per set (S)")
    control_matching: Literal["batch", "random"] = "batch"
    epoch_mode: Literal["cells", "groups"] = Field(
        "cells", description="cells: a group appears ~n_cells/S times per epoch; groups: once"
    )
    seed: int = 0

    @field_validator("set_size")
    @classmethod
    def _positive_set(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"set size must be >= 1 (got {value})")
        return value


def load_yaml(path: str | Path) -> dict[str, object]:
    path = Path(path)
    if not path.exists():
        raise ScaleError(f"config file {path} does not exist", "check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ScaleError(f"config file {path} is not valid YAML ({exc.__class__.__name__})", "fix the syntax") from None
    if not isinstance(data, dict):
        raise ScaleError(f"config file {path} must hold a mapping at top level", "fix the file")
    return data


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def validate_config(cls: type[StrictModel], data: dict[str, object], where: str) -> StrictModel:
    """Build `cls` or raise a one-line ScaleError naming the first bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ScaleError(f"invalid {where}: {loc}: {msg}", "fix that value") from None


class SynthConfig(StrictModel):
    """A synthetic perturbation screen with a known generative structure (see data/synth.py)."""

    n_cells: int = Field(20_000, ge=100, description="approximate total cells (controls included)")
    n_genes: int = Field(1000, ge=10)
    n_programs: int = Field(20, ge=1)
    n_contexts: int = Field(5, ge=1)
    n_batches: int = Field(2, ge=1, description="batches per context")
    n_perturbations: int = Field(40, ge=1, description="single perturbations")
    n_combinations: int = Field(0, ge=0, description="pairs A+B whose effect is the sum of A and B plus an interaction")
    n_substates: int = Field(3, ge=1, description="cell substates per context")
    control_fraction: float = Field(0.15, gt=0, lt=1)
    responder_fraction: tuple[float, float] = (0.4, 1.0)
    effect_scale: float = Field(1.0, ge=0)
    context_specificity: float = Field(0.5, ge=0, description="size of context-specific effect deviations")
    batch_effect: float = Field(0.15, ge=0)
    library_size: float = Field(3000.0, gt=0)
    library_sd: float = Field(0.3, ge=0)
    nb_theta: float = Field(5.0, gt=0, description="negative-binomial inverse dispersion")
    seed: int = 0
    chunk_rows: int = Field(20_000, ge=1)
