"""Build and run a SCALE training job on NeMo 2 (`nl.Trainer` + `MegatronStrategy`).

The same code runs on CPU (gloo, the CPU shim from `bionemo_scale.parallel`) and on GPU
(NCCL, bf16, Transformer Engine FP8). A run directory holds everything needed to resume,
predict and export:

    RUN/config.yaml       the validated ScaleConfig (vocabulary sizes filled in)
    RUN/vocab.json        genes, perturbations, parts, contexts, batches, normalisation
    RUN/checkpoints/      NeMo/megatron distributed checkpoints (interval, best, last)
    RUN/tb/               TensorBoard logs
    RUN/logs/             NeMo's own logs
    RUN/train_loss.csv    the loss of every optimizer step (stop-and-go tests read it)
    RUN/val_loss.csv      the validation loss of every validation pass
    RUN/metrics/          per-validation per-perturbation metric CSVs (validation callback)
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

from bionemo_scale.atomic import atomic_file
from bionemo_scale.config import ScaleConfig, dump_yaml
from bionemo_scale.errors import ScaleError
from bionemo_scale.matmul_precision import float32_matmul_precision
from bionemo_scale.parallel import patch_nemo_for_cpu
from bionemo_scale.train import nemo_compat
from bionemo_scale.train.optimizer import build_optimizer
from bionemo_scale.train.resume import SPLIT_RECORD, check_resume, check_split_unchanged, split_record

logger = logging.getLogger(__name__)


def resolve_accelerator(cfg: ScaleConfig) -> str:
    acc = cfg.trainer.accelerator
    if acc == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if acc == "gpu" and not torch.cuda.is_available():
        raise ScaleError("trainer.accelerator=gpu but no CUDA device is visible", "use trainer.accelerator=cpu")
    if acc == "cpu" and torch.cuda.is_available():
        # the CPU shim and the batch placement follow torch.cuda.is_available(), not the accelerator
        raise ScaleError(
            "trainer.accelerator=cpu on a machine with a visible GPU is not supported",
            "hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU, or use trainer.accelerator=gpu",
        )
    return acc


def check_world(cfg: ScaleConfig) -> None:
    """devices × nodes must equal TP × PP × DP, and a torchrun launch must agree with the config."""
    t = cfg.trainer
    world = t.devices * t.num_nodes
    tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ScaleError(
            f"devices × nodes = {world} is not TP × PP × DP for TP={tp}, PP={pp}",
            "set trainer.devices so that devices × num_nodes is a multiple of TP × PP",
        )
    env_world = os.environ.get("WORLD_SIZE")
    if env_world and int(env_world) != world:
        raise ScaleError(
            f"launched with WORLD_SIZE={env_world} but the config asks for devices × nodes = {world}",
            "make trainer.devices × trainer.num_nodes equal the number of launched processes",
        )


def data_vocabulary(data_path: str) -> dict[str, object]:
    """The run's data contract: what a checkpoint's rows and ids mean."""
    from bionemo_scale.data.store import ProcessedDataset

    data = ProcessedDataset(data_path)
    idx = data.index
    return {
        "genes": data.genes,
        "control_label": idx.control_label,
        "perturbations": idx.perturbations,
        "pert_parts": idx.pert_parts,
        "parts": idx.parts,
        "contexts": idx.contexts,
        "batches": idx.batches,
        "combo_sep": idx.combo_sep,
        "normalisation": data.manifest.get("normalisation", {}),
        "dataset": data.dataset_name,
    }


def with_vocabulary(cfg: ScaleConfig, vocab: dict[str, object]) -> ScaleConfig:
    model = cfg.model.model_copy(
        update={
            "n_genes": len(vocab["genes"]),
            "n_parts": len(vocab["parts"]),
            "n_contexts": len(vocab["contexts"]),
            "n_batches": len(vocab["batches"]),
        }
    )
    return cfg.model_copy(update={"model": model})


def _is_logging_rank() -> bool:
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def _append_row(path: Path, header: list[str], row: list[object]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)


class LossHistory(pl.Callback):
    """RUN/train_loss.csv (every optimizer step) and RUN/val_loss.csv (every validation).

    Written by the logging rank only; a resumed run appends, so the files show the replay.
    """

    def __init__(self, run_dir: Path) -> None:
        self.train_path = run_dir / "train_loss.csv"
        self.val_path = run_dir / "val_loss.csv"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _is_logging_rank():
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            _append_row(self.train_path, ["step", "loss"], [trainer.global_step, f"{float(loss):.10g}"])

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if value is not None and _is_logging_rank() and not trainer.sanity_checking:
            _append_row(self.val_path, ["step", "val_loss"], [trainer.global_step, f"{float(value):.10g}"])


def build_trainer(
    cfg: ScaleConfig, run_dir: Path, extra_callbacks: list[pl.Callback] | None = None, progress: bool = True
):
    """(trainer, nemo_logger, auto_resume) for this config."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from nemo import lightning as nl

    from bionemo_scale.train.checkpointing import ScaleModelCheckpoint

    accelerator = resolve_accelerator(cfg)
    if accelerator == "cpu":
        patch_nemo_for_cpu()
    nemo_compat.apply()
    t, ck = cfg.trainer, cfg.checkpoint
    pipeline_dtype = torch.bfloat16 if t.precision == "bf16-mixed" else torch.float32
    strategy = nl.MegatronStrategy(
        tensor_model_parallel_size=t.tensor_model_parallel_size,
        pipeline_model_parallel_size=t.pipeline_model_parallel_size,
        pipeline_dtype=pipeline_dtype,
        ckpt_async_save=False,
        ckpt_parallel_save=False,
        ckpt_load_strictness="log_all",
        # NeMo's replacement, ProgressPrinter, gathers megatron timers over the whole world
        # on rank 0 only; with TP/PP > 1 the next world collective (a checkpoint) then hangs.
        replace_progress_bar=False,
    )
    # FP8 goes to the precision plugin too: MegatronStrategy copies every plugin setting onto the
    # model's TransformerConfig, so a plugin without fp8 would silently turn model.fp8 off.
    plugins = nl.MegatronMixedPrecision(
        precision=t.precision,
        params_dtype=pipeline_dtype,
        pipeline_dtype=pipeline_dtype,
        fp8=cfg.model.fp8,
        fp8_recipe=cfg.model.fp8_recipe,
    )
    checkpoint = ScaleModelCheckpoint(
        monitor=ck.monitor,
        mode=ck.mode,
        save_top_k=ck.save_top_k,
        save_last=ck.save_last,
        every_n_train_steps=ck.every_n_train_steps,
        dirpath=str(run_dir / "checkpoints"),
        filename="{step}-{consumed_samples}",
        always_save_context=False,
        save_context_on_train_end=False,
        save_optim_on_train_end=True,  # the final checkpoint must stay resumable (extend max_steps)
    )
    # The checkpoint callback goes straight to the Trainer (not through NeMoLogger(ckpt=...)):
    # NeMoLogger's hand-over probes nvidia-resiliency-ext, which is not installed here.
    callbacks: list[pl.Callback] = [checkpoint, LossHistory(run_dir), *(extra_callbacks or [])]
    trainer = nl.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        plugins=plugins,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_progress_bar=progress,
        callbacks=callbacks,
        deterministic=False,
    )
    # NeMoLogger moves every top-level file of its log dir into run_N/ on each start, so it
    # gets a subdirectory of its own; config, vocab, losses and checkpoints stay put.
    nemo_logger = nl.NeMoLogger(
        explicit_log_dir=str(run_dir / "logs"),
        tensorboard=TensorBoardLogger(save_dir=str(run_dir), name="tb", version=""),
        ckpt=None,
        update_logger_directory=False,
    )
    resume = nl.AutoResume(
        resume_if_exists=True, resume_ignore_no_checkpoint=True, resume_from_directory=str(run_dir / "checkpoints")
    )
    return trainer, nemo_logger, resume


ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "ffn_hidden_size",
    "encoder_hidden_size",
    "use_control_stats",
    "pert_feature_dim",
    "latent_residual",
    "gene_residual",
)


def prepare_run(
    cfg: ScaleConfig, run_dir: Path, gene_map: dict[str, str] | None = None
) -> tuple[ScaleConfig, dict[str, object]]:
    """Fill in the vocabulary (extended from the release when fine-tuning).

    A resumed run must see the same genes; a fine-tuning run takes the release's architecture.
    """
    vocab = data_vocabulary(cfg.data.path)  # type: ignore[arg-type]
    if cfg.init_from:
        from bionemo_scale.registry import resolve
        from bionemo_scale.train.finetune import extend_vocabulary
        from bionemo_scale.train.release import read_release_meta

        release_dir = resolve(cfg.init_from)
        rel_cfg, rel_vocab = read_release_meta(release_dir)
        if gene_map:
            renamed = [gene_map.get(g, g) for g in vocab["genes"]]  # type: ignore[union-attr]
            missing = sorted(set(rel_vocab["genes"]) - set(renamed))  # type: ignore[arg-type]
            if missing:
                raise ScaleError(
                    f"{len(missing)} release genes are absent from the data after --gene-map, e.g. {missing[:5]}",
                    "extend the gene map, or preprocess data that measures these genes",
                )
            vocab["genes"] = list(rel_vocab["genes"])  # type: ignore[arg-type]
        vocab = extend_vocabulary(rel_vocab, vocab)
        arch = {f: getattr(rel_cfg.model, f) for f in ARCHITECTURE_FIELDS}
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=arch), "init_from": str(release_dir)})
    cfg = with_vocabulary(cfg, vocab)
    vocab_path = run_dir / "vocab.json"
    if vocab_path.exists():
        old = json.loads(vocab_path.read_text())
        if old["genes"] != vocab["genes"]:
            raise ScaleError(
                f"{run_dir} was trained on a different gene list than {cfg.data.path}",
                "resume with the same dataset, or start a new --output run",
            )
    return cfg, vocab


def warn_stale_checkpoint_scores(cfg: ScaleConfig) -> None:
    """Best-by-metric needs a fresh score at every checkpoint step (see train/checkpointing.py)."""
    ck, t = cfg.checkpoint, cfg.trainer
    if ck.save_top_k == 0:
        return
    if ck.every_n_train_steps % t.val_check_interval:
        logger.warning(
            "checkpoint.every_n_train_steps=%d is not a multiple of trainer.val_check_interval=%d: "
            "some checkpoints are ranked by an older validation's %s",
            ck.every_n_train_steps, t.val_check_interval, ck.monitor,
        )  # fmt: skip
    elif ck.monitor.startswith("val/") and cfg.eval.every_n_validations > 1:
        logger.warning(
            "checkpoint.monitor=%s is computed every %d validations (eval.every_n_validations): "
            "checkpoints in between are ranked by an older value",
            ck.monitor, cfg.eval.every_n_validations,
        )  # fmt: skip


def write_run_files(
    cfg: ScaleConfig, vocab: dict[str, object], run_dir: Path, split: dict[str, object] | None = None
) -> None:
    """config.yaml, vocab.json and split.json, written once by global rank 0 (after NeMoLogger set the dir up)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "vocab.json").write_text(json.dumps(vocab))
    if split is not None:  # atomically: other ranks may be reading the previous one (check_split_unchanged)
        with atomic_file(run_dir / SPLIT_RECORD) as tmp:
            tmp.write_text(json.dumps(split, indent=1) + "\n")


def train(
    cfg: ScaleConfig,
    run_dir: str | Path,
    extra_callbacks: list[pl.Callback] | None = None,
    gene_map: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Train, fine-tune (cfg.init_from) or resume into `run_dir`; returns the run directory."""
    from nemo.lightning.pytorch.callbacks import ModelCheckpoint  # noqa: F401 - fail early if NeMo is broken

    run_dir = Path(run_dir)
    check_world(cfg)
    if resolve_accelerator(cfg) == "cpu" and cfg.model.spec == "te":
        raise ScaleError("model.spec=te needs Transformer Engine on a GPU", "use model.spec=local on CPU")
    cfg, vocab = prepare_run(cfg, run_dir, gene_map)
    check_resume(cfg, run_dir)
    if _already_trained(cfg, run_dir):
        return run_dir
    with float32_matmul_precision(cfg.trainer.matmul_precision):
        return _fit(cfg, run_dir, vocab, extra_callbacks, gene_map, progress)


def _fit(
    cfg: ScaleConfig,
    run_dir: Path,
    vocab: dict[str, object],
    extra_callbacks: list[pl.Callback] | None,
    gene_map: dict[str, str] | None,
    progress: bool,
) -> Path:
    from bionemo_scale.train.data import ScaleDataModule
    from bionemo_scale.train.module import ScaleLightningModule

    pl.seed_everything(cfg.trainer.seed, workers=True)
    torch.use_deterministic_algorithms(cfg.trainer.deterministic, warn_only=True)

    callbacks = [*(extra_callbacks or []), TrainingStarted()]
    if cfg.eval.enabled:
        from bionemo_scale.eval.callback import BiologicalMetricsCallback

        callbacks.append(BiologicalMetricsCallback.from_config(cfg, run_dir))
    module = ScaleLightningModule(
        cfg, optim=build_optimizer(cfg, cpu=resolve_accelerator(cfg) == "cpu"), run_vocab=vocab, init_from=cfg.init_from
    )
    datamodule = ScaleDataModule(cfg, seq_length=module.seq_length, run_vocab=vocab, gene_map=gene_map)
    split = split_record(datamodule.data.index, datamodule.labels, str(cfg.data.split))
    check_split_unchanged(run_dir, split)
    trainer, nemo_logger, resume = build_trainer(cfg, run_dir, callbacks, progress=progress)
    if datamodule.val_groups.size == 0:
        logger.warning("the split has no validation pairs: validation and metric-based checkpointing are off")
        trainer.limit_val_batches = 0
    else:
        warn_stale_checkpoint_scores(cfg)
    nemo_logger.setup(trainer, resume_if_exists=True)
    # NeMo's telemetry callbacks must be configured before fit (as nemo.collections.llm's
    # _setup does), or the first checkpoint save raises OneLoggerError.
    from nemo.lightning.callback_group import CallbackGroup

    CallbackGroup.get_instance().update_config(nemo_version="v2", trainer=trainer, data=datamodule)
    write_run_files(cfg, vocab, run_dir, split)
    if datamodule.prior is not None and int(os.environ.get("RANK", "0")) == 0:
        datamodule.prior.save(run_dir / "prior.safetensors")
    from bionemo_scale.train.release import damaged_checkpoint_errors

    resume.setup(trainer, module)
    started = next(c for c in trainer.callbacks if isinstance(c, TrainingStarted))
    try:
        trainer.fit(module, datamodule=datamodule)
    except Exception as exc:  # NeMo wraps the loader's error in a RuntimeError: look down the chain
        ckpt = getattr(trainer, "ckpt_path", None)
        cause = _first_of(exc, damaged_checkpoint_errors(with_os_errors=False))
        if started.started or not ckpt or cause is None:
            raise
        raise ScaleError(
            f"cannot resume from checkpoint {ckpt} ({type(cause).__name__}): it is incomplete or damaged",
            f"delete {ckpt} to resume from the checkpoint before it, or train into a new --output directory",
        ) from None
    return run_dir


def _already_trained(cfg: ScaleConfig, run_dir: Path) -> bool:
    """A run whose last checkpoint has reached trainer.max_steps has nothing left to train.

    Its files are then left alone: config.yaml records the settings that trained the
    checkpoints, and a resume that trains nothing must not rewrite that record (with, say,
    other eval.* settings, or keys added to the config since the run was written).
    """
    from bionemo_scale.train.release import trained_steps

    done = trained_steps(run_dir) if (run_dir / "config.yaml").is_file() else None
    if done is None or done < cfg.trainer.max_steps:
        return False
    logger.warning(
        "%s already holds %d trained steps (trainer.max_steps=%d): nothing to train, its files are left as they are; "
        "raise trainer.max_steps to continue it",
        run_dir, done, cfg.trainer.max_steps,
    )  # fmt: skip
    return True


def _first_of(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `types` in `exc`'s chain of causes (None if there is none)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


class TrainingStarted(pl.Callback):
    """Whether training got past restoring its checkpoint: errors before that are the checkpoint's."""

    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True
