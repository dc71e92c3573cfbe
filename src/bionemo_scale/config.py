"""Pydantic configs: the exposed, validated surface of every job, with YAML in and out.

Internal megatron `TransformerConfig`s are *derived* from these (see `model/`), following
BioNeMo's split between user-facing config and engine config.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bionemo_scale.errors import ScaleError, read_user_text


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
    combo_sep: str = Field("+", min_length=1)

    @field_validator("keep_obs")
    @classmethod
    def _keep_obs_not_reserved(cls, value: list[str]) -> list[str]:
        """obs.parquet already has these columns; keeping a same-named one would collide."""
        taken = sorted(set(value) & {"cell_id", "source_row"})
        if taken:
            raise ValueError(f"{taken} are written by preprocess itself; rename those obs columns first")
        return value

    target_sum: float = Field(1e4, gt=0)
    chunk_rows: int = Field(
        5_000, ge=1, description="rows per streamed chunk; 5k measured faster than 20k at 0.25-3M cells"
    )
    matrix_key: str = "X"
    dataset_name: str | None = None


class SamplerConfig(StrictModel):
    """How set pairs are drawn from a processed dataset."""

    set_size: int = Field(64, description="cells per set (S)")
    control_matching: Literal["batch", "random"] = "batch"
    epoch_mode: Literal["cells", "groups"] = Field(
        "cells", description="cells: a group appears ~n_cells/S times per epoch; groups: once"
    )
    seed: int = Field(0, ge=0)

    @field_validator("set_size")
    @classmethod
    def _positive_set(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"set size must be >= 1 (got {value})")
        return value


def load_yaml(path: str | Path) -> dict[str, object]:
    path = Path(path)
    text = read_user_text(path, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScaleError(f"config file {path} is not valid YAML ({exc.__class__.__name__})", "fix the syntax") from None
    if data is None:
        raise ScaleError(
            f"config file {path} is empty",
            "write the settings into it (a run's own config.yaml: restore it from a copy)",
        )
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
    program_gain_sd: float = Field(
        0.5, ge=0, description="log-normal sd of per-(context, program) effect gains (learnable context dependence)"
    )
    batch_effect: float = Field(0.15, ge=0)
    library_size: float = Field(3000.0, gt=0)
    library_sd: float = Field(0.3, ge=0)
    nb_theta: float = Field(5.0, gt=0, description="negative-binomial inverse dispersion")
    seed: int = Field(0, ge=0)
    chunk_rows: int = Field(20_000, ge=1)

    @model_validator(mode="after")
    def _enough_pairs(self) -> SynthConfig:
        """Combinations are distinct pairs of singles; asking for more would never finish drawing."""
        most = self.n_perturbations * (self.n_perturbations - 1) // 2
        if self.n_combinations > most:
            raise ValueError(
                f"n_combinations {self.n_combinations} exceeds the {most} pairs of {self.n_perturbations} perturbations"
            )
        return self


class ScaleModelConfig(StrictModel):
    """The exposed SCALE architecture. `model.transformer_config.to_transformer_config` derives
    megatron's `TransformerConfig` from it (BioNeMo's split: user config vs engine config).
    """

    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(8, ge=1)
    ffn_hidden_size: int | None = Field(None, description="SwiGLU width; default 4 × hidden")
    encoder_hidden_size: int | None = Field(None, description="gene encoder/decoder MLP width; default 2 × hidden")
    spec: Literal["local", "te"] = Field("local", description="megatron local modules (CPU) or Transformer Engine")
    fp8: Literal["hybrid", "e4m3"] | None = Field(None, description="TE FP8 format; needs spec=te and a GPU")
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    hidden_dropout: float = Field(0.0, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    # conditioning
    use_control_stats: bool = Field(True, description="a token of per-gene mean/std of the control set")
    context_dropout: float = Field(0.1, ge=0, le=1, description="train the unknown-context token for zero-shot")
    pert_dropout: float = Field(
        0.0, ge=0, le=1, description="replace the perturbation's parts by 'unknown': learn from the prior alone"
    )
    pert_feature_dim: int = Field(0, ge=0, description="width of optional perturbation feature vectors")
    additive_prior: bool = Field(
        True, description="predict on top of the additive baseline's shift (leave-context-out training deltas)"
    )
    prior_cover: bool = Field(
        False,
        description="drop a perturbation's parts whose in-context single shift the prior already sums "
        "(a combination A+B), so their embeddings cannot add it twice; off: it lowered validation PDCorr "
        "on Norman combinations (benchmarks/RESULTS_LOG.md)",
    )
    prior_rank: int | Literal["auto"] | None = Field(
        None,
        description="project the additive prior onto the top-k directions of the training deltas "
        "(low-rank denoising); 'auto' picks k by 5-fold CV on training pairs; None: the raw prior",
    )
    prior_basis_leave_one_out: bool = Field(
        False,
        description="with prior_rank: project each training pair's prior onto a basis built without its "
        "own delta, as a held-out pair's is (off: the training basis; matched training gave lower "
        "validation scores, benchmarks/RESULTS_LOG.md)",
    )
    prior_self_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of training sets shown their own training shift as the prior with all parts "
        "dropped: teaches that a covered prior is the answer (what prior_cover relies on)",
    )
    # parameterisation
    latent_residual: bool = Field(True, description="endpoint = z_t + (1 - t) · head(h)")
    gene_residual: bool = Field(True, description="decoded cell = x0 + dec(ẑ1) − dec(z0), keeping control detail")
    center_controls: bool = Field(
        False,
        description="with gene_residual: move each control set onto its pool's mean before the residual, so "
        "the sampled cells' mean deviation does not become predicted shift (data/control_means.py)",
    )
    # vocabulary (filled from the data at train time; a checkpoint stores them)
    n_genes: int = Field(0, ge=0)
    n_parts: int = Field(0, ge=0)
    n_contexts: int = Field(0, ge=0)
    n_batches: int = Field(0, ge=0)

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def encoder_width(self) -> int:
        return self.encoder_hidden_size or 2 * self.hidden_size

    @field_validator("prior_rank", mode="before")
    @classmethod
    def _prior_rank(cls, value: object) -> object:
        """One clear message instead of pydantic's per-member union errors."""
        ok = value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        if not ok:
            raise ValueError(f"must be a positive integer, 'auto' or null (0 also means off), not {value!r}")
        return value

    @model_validator(mode="after")
    def _centring_needs_residual(self) -> ScaleModelConfig:
        if self.center_controls and not self.gene_residual:
            raise ValueError("center_controls moves the gene residual's control cells: it needs gene_residual=true")
        return self


class FlowConfig(StrictModel):
    """Conditional transport and endpoint supervision."""

    coupling: Literal["ot", "identity"] = "ot"
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"
    endpoint_weight: float = Field(1.0, ge=0)
    reconstruction_weight: float = Field(1.0, ge=0)
    distribution_weight: float = Field(0.1, ge=0)
    distribution_loss: Literal["energy", "mmd"] = "energy"
    gene_mse_weight: float = Field(1.0, ge=0, description="MSE of the decoded endpoint against the matched cells")
    pseudobulk_weight: float = Field(
        1.0, ge=0, description="MSE of the set means (predicted vs real pseudobulk): the low-noise population signal"
    )
    stop_grad_target: bool = Field(True, description="no gradient into the encoder through the latent target")
    inference_steps: int = Field(1, ge=1, description="NFE at prediction time (1 = one endpoint step)")
    solver: Literal["euler", "heun"] = "euler"
    count_lattice: bool = Field(
        True,
        description="predicted values below one count become 0 or one count (expectation kept): a real cell "
        "has no fractional counts, and sub-count values make every silent gene look differentially expressed",
    )
    combinations: Literal["direct", "compose"] = Field(
        "direct",
        description="how a combination A+B whose singles exist in its context is predicted: 'direct' "
        "conditions on A+B; 'compose' sums the model's predicted single shifts on the same control cells",
    )


class DataConfig(StrictModel):
    """Where set pairs come from and how many are in a batch."""

    path: str | None = Field(None, description="processed dataset directory (set by --data)")
    split: str | None = Field(None, description="TOML split file, or 'split-col' (set by --split)")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    micro_batch_size: int = Field(8, ge=1, description="set pairs per microbatch per data-parallel rank")
    global_batch_size: int | None = Field(None, description="default: micro_batch_size × data-parallel size")
    num_workers: int = Field(0, ge=0)
    val_sets_per_pair: int = Field(2, ge=1, description="validation set pairs drawn per held-out (context, pert)")


class OptimConfig(StrictModel):
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = Field(20, ge=0)
    clip_grad: float = Field(1.0, ge=0)
    cpu_fused_adam: bool = Field(
        True,
        description="on CPU, run torch's fused Adam kernel instead of its per-tensor loop (~4x faster "
        "optimizer step; same update to float32 rounding, not bit for bit); ignored on GPU",
    )


class CheckpointConfig(StrictModel):
    every_n_train_steps: int = Field(50, ge=1)
    save_top_k: int = Field(1, description="-1 keeps all")
    monitor: str = Field("val_loss", description="'val_loss' or a logged metric such as 'val/pearson_delta'")
    mode: Literal["min", "max"] = "min"
    save_last: bool = True


class EvalConfig(StrictModel):
    """Biological metrics computed by the validation callback."""

    enabled: bool = True
    profile: Literal["fast", "full"] = "fast"
    every_n_validations: int = Field(1, ge=1)
    max_pairs: int | None = Field(None, description="cap on validation pairs per evaluation")
    cells_per_pair: int | None = Field(None, description="predicted cells per pair (default: as many as real)")
    steps: int = Field(1, ge=1, description="NFE for validation predictions")
    save_predictions: bool = Field(False, description="also write each validation's PRED/REAL h5ad (for audits)")


class TrainerConfig(StrictModel):
    max_steps: int = Field(200, ge=1)
    val_check_interval: int = Field(50, ge=1)
    limit_val_batches: int | float = 1.0
    log_every_n_steps: int = Field(10, ge=1)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = Field(1, ge=1, description="processes per node (CPU) or GPUs per node")
    num_nodes: int = Field(1, ge=1)
    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    precision: Literal["32", "bf16-mixed"] = "32"
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        "highest",
        description="torch float32 matmul precision while training: 'high' lets Ampere+ GPUs use TF32, "
        "'medium' lets GPUs and AMX/AVX512-BF16 CPUs use bf16 products inside float32 matmuls (faster, "
        "fewer digits); set distances and OT costs run in float64 whenever it is not 'highest'",
    )
    autocast: Literal["off", "bf16"] = Field(
        "off",
        description="'bf16' runs the forward (and so the backward) under torch's bf16 autocast with "
        "float32 weights, gradients and optimizer state: bf16 matmuls, 1.3-1.5x faster training steps "
        "on CPUs with AVX512-BF16 or AMX. On GPUs, trainer.precision=bf16-mixed is megatron's bf16 "
        "(bf16 weights, float32 main gradients), which CPUs cannot run",
    )
    seed: int = Field(1234, ge=0)
    deterministic: bool = True

    @model_validator(mode="after")
    def _one_bf16_at_a_time(self) -> TrainerConfig:
        if self.autocast != "off" and self.precision != "32":
            raise ValueError(
                f"trainer.autocast={self.autocast} and trainer.precision={self.precision} both ask for bf16: "
                "use trainer.precision=bf16-mixed on GPUs, or trainer.autocast=bf16 with trainer.precision=32"
            )
        return self


class ScaleConfig(StrictModel):
    """A full SCALE job: what a recipe returns and what `bionemo-scale train` runs."""

    name: str = "scale"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ScaleModelConfig = Field(default_factory=ScaleModelConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    init_from: str | None = Field(None, description="release (name, path or file:// URL) to fine-tune from")

    @model_validator(mode="after")
    def _monitored_metric_exists(self) -> ScaleConfig:
        """A typo in checkpoint.monitor would only fail at the first validation, after training time."""
        monitor = self.checkpoint.monitor
        if monitor == "val_loss":
            return self
        from bionemo_scale.eval.metrics import PROFILES

        logged = [f"val/{m}" for m in PROFILES[self.eval.profile]] if self.eval.enabled else []
        if monitor not in logged:
            hint = (
                f"val_loss or a metric of eval.profile such as {', '.join(logged[:4])}"
                if logged
                else "val_loss (eval.enabled=false)"
            )
            raise ValueError(f"checkpoint.monitor {monitor!r} is not logged by this config; use {hint}")
        return self

    @model_validator(mode="after")
    def _parallel_layout(self) -> ScaleConfig:
        """Shape errors caught here, at config time, not deep inside megatron."""
        m, t = self.model, self.trainer
        tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
        if m.hidden_size % m.num_attention_heads:
            raise ValueError(
                f"hidden_size {m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}"
            )
        if m.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads {m.num_attention_heads} is not divisible by TP size {tp}")
        if m.hidden_size % tp or m.ffn % tp or m.encoder_width % tp:
            raise ValueError(f"hidden/ffn/encoder widths must be divisible by TP size {tp}")
        if m.num_layers % pp:
            raise ValueError(f"num_layers {m.num_layers} is not divisible by PP size {pp}")
        world = t.devices * t.num_nodes
        if world % (tp * pp):
            raise ValueError(f"devices × nodes = {world} is not a multiple of TP × PP = {tp * pp}")
        if m.fp8 and m.spec != "te":
            raise ValueError("fp8 needs model.spec=te (Transformer Engine)")
        if m.fp8:
            # Transformer Engine's FP8 GEMMs take [rows, cols] with rows % 8 == 0 and cols % 16 == 0;
            # the rows are the tokens of the sets in a microbatch (condition tokens + cells)
            tokens = 4 + int(m.use_control_stats) + self.data.sampler.set_size
            if tokens % 8:
                size = self.data.sampler.set_size
                raise ValueError(
                    f"fp8 needs the tokens per set (condition tokens + data.sampler.set_size = {tokens}) to be a "
                    f"multiple of 8: use data.sampler.set_size={size - tokens % 8} or {size + 8 - tokens % 8}"
                )
            widths = {"hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn, "encoder width": m.encoder_width}
            odd = {k: v for k, v in widths.items() if (v // tp) % 16}
            if odd:
                raise ValueError(f"fp8 needs widths (per TP rank) that are multiples of 16, not {odd}")
        return self

    @property
    def data_parallel_size(self) -> int:
        t = self.trainer
        return (t.devices * t.num_nodes) // (t.tensor_model_parallel_size * t.pipeline_model_parallel_size)

    @property
    def global_batch_size(self) -> int:
        return self.data.global_batch_size or self.data.micro_batch_size * self.data_parallel_size


def flatten_config(data: dict[str, object], prefix: str = "") -> dict[str, object]:
    """A nested config mapping as {"section.key": value}: the override and resume checks' view."""
    out: dict[str, object] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{path}."))
        else:
            out[path] = value
    return out


def apply_overrides(cfg: ScaleConfig, overrides: list[str]) -> ScaleConfig:
    """Apply dotted `key=value` overrides (values parsed as YAML scalars), re-validating the whole.

    An unknown key is an error that lists the valid keys, so typos never pass silently.
    """
    data = cfg.model_dump(mode="json")
    valid = flatten_config(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ScaleError(f"override '{item}' is not key=value", "write e.g. trainer.max_steps=40")
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=4, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid keys: {', '.join(sorted(valid))}"
            raise ScaleError(f"unknown config key '{key}'", hint)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]  # type: ignore[assignment]
        node[leaf] = value  # type: ignore[index]
    return validate_config(ScaleConfig, data, "config")  # type: ignore[return-value]
