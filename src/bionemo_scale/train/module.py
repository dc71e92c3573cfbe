"""The NeMo 2 LightningModule for SCALE and its Megatron loss reductions.

NeMo's MegatronStrategy drives megatron's pipeline schedules through four hooks:
`configure_model` builds this rank's pipeline stage, `data_step` turns a dataloader item into
the microbatch every stage sees, `forward_step` runs the stage, and the loss reduction turns
the last stage's output into the loss (per microbatch) and the logged value (per step).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import torch
from megatron.core import parallel_state
from nemo.lightning.megatron_parallel import MegatronLossReduction

from bionemo_scale.config import FlowConfig, ScaleConfig
from bionemo_scale.model.autocast import forward_autocast, outputs_to_float32
from bionemo_scale.model.batch import prepare_flow_batch
from bionemo_scale.model.objective import loss_terms
from bionemo_scale.model.scale_model import ScaleModel, ScaleOutput, conditions_of
from bionemo_scale.model.transformer_config import build_transformer_config

logger = logging.getLogger(__name__)

TERM_NAMES = ("endpoint", "gene", "pseudobulk", "reconstruction", "distribution")


class ScaleLossReduction(MegatronLossReduction):
    """Mean per-set loss of a microbatch; the logged value is averaged over data-parallel ranks.

    `last_terms` keeps the last reduced step's per-term means, which the module logs as
    `train/<term>` after every training step and `val/<term>` (averaged over the pass) after
    every validation step.
    """

    def __init__(self, flow: FlowConfig) -> None:
        super().__init__()
        self.flow = flow
        self.last_terms: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor], forward_out: ScaleOutput):
        terms = loss_terms(forward_out, batch["ctrl"], batch["pert"], self.flow)
        loss = terms["loss"].mean()
        logged = torch.stack([loss.detach()] + [terms[k].mean().detach() for k in TERM_NAMES])
        return loss, {"avg": logged}

    def reduce(self, losses_reduced_per_micro_batch: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        if not losses_reduced_per_micro_batch:
            return torch.tensor(0.0)
        stacked = torch.stack([d["avg"] for d in losses_reduced_per_micro_batch]).mean(dim=0)
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
            stacked = stacked / parallel_state.get_data_parallel_world_size()
        self.last_terms = {name: float(v) for name, v in zip(("loss", *TERM_NAMES), stacked.tolist(), strict=True)}
        return stacked[0]


class ScaleLightningModule(pl.LightningModule):
    """SCALE under NeMo's MegatronStrategy (TP/PP/DP, bf16, TE FP8 where present)."""

    def __init__(
        self,
        cfg: ScaleConfig,
        optim: object | None = None,
        run_vocab: dict[str, object] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_vocab = run_vocab
        self.init_from = init_from
        # NeMo's strategy and precision plugin read and update `config` (dtypes, fp8) before
        # `configure_model` builds the stage from it.
        self.config = build_transformer_config(
            cfg.model, cfg.trainer.tensor_model_parallel_size, cfg.trainer.pipeline_model_parallel_size
        )
        self.optim = optim
        if optim is not None:
            optim.connect(self)  # binds configure_optimizers
        self._train_reduction = ScaleLossReduction(cfg.flow)
        self._val_reduction = ScaleLossReduction(cfg.flow)

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self, vp_stage: int | None = None) -> None:
        if hasattr(self, "module"):
            return
        self.module = ScaleModel(
            self.config,
            self.cfg.model,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        if self.init_from:
            from bionemo_scale.train.finetune import init_from_release

            init_from_release(self.module, self.init_from, self.run_vocab or {})

    @property
    def seq_length(self) -> int:
        """Sequence length of the activations exchanged between pipeline stages (T + 3S)."""
        return 4 + int(self.cfg.model.use_control_stats) + 3 * self.cfg.data.sampler.set_size

    def forward(
        self,
        ctrl: torch.Tensor,
        t: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        pert: torch.Tensor | None = None,
    ) -> ScaleOutput | torch.Tensor:
        # By keyword, not position: with bf16/fp16, megatron's Float16Module casts the first
        # stage's *positional* tensor inputs to half precision. The cells feed the gene residual
        # (X0 + dec(Ẑ1) − dec(Z0)) and t feeds sin/cos features at up to 1,000 rad, so both
        # must stay fp32; the model casts what its layers need itself.
        # `trainer.autocast`: bf16 matmuls, float32 weights; what comes out is float32 again, so
        # the losses reduce in float32 and pipeline stages exchange their buffers' dtype.
        with forward_autocast(self.cfg.trainer.autocast, _local_device().type):
            out = self.module(ctrl=ctrl, t=t, conditions=conditions, pert=pert)
        return out if self.cfg.trainer.autocast == "off" else outputs_to_float32(out)

    # -- NeMo hooks ----------------------------------------------------------------------------
    def data_step(self, dataloader_iter: Iterator) -> dict[str, torch.Tensor]:
        batch = next(dataloader_iter)
        if isinstance(batch, tuple) and len(batch) == 3:  # (batch, batch_idx, dataloader_idx)
            batch = batch[0]
        device = _local_device()
        training = self.trainer is not None and self.trainer.training
        if self.cfg.model.additive_prior:
            priors = self.trainer.datamodule.priors
            batch["prior"] = priors.batch(batch["group_id"])
            batch["parts"] = priors.uncover(batch["group_id"], batch["parts"])
            if training and self.cfg.model.prior_self_rate > 0:
                batch["prior_self"], batch["prior_self_ok"] = priors.own_batch(batch["group_id"])
        if self.cfg.model.center_controls:
            batch["control_mean"] = self.trainer.datamodule.control_means.batch(batch["group_id"])
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return prepare_flow_batch(
            batch,
            self.cfg.flow,
            seed=self.cfg.trainer.seed,
            context_dropout=self.cfg.model.context_dropout if training else 0.0,
            unknown_context=self.cfg.model.n_contexts,
            pert_dropout=self.cfg.model.pert_dropout if training else 0.0,
            unknown_part=self.cfg.model.n_parts,
            prior_self_rate=self.cfg.model.prior_self_rate if training else 0.0,
            training=True,  # validation loss is teacher-forced on the same kind of t
        )

    def forward_step(self, batch: dict[str, torch.Tensor]) -> ScaleOutput | torch.Tensor:
        return self(batch["ctrl"], batch["t"], conditions_of(batch), batch["pert"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int | None = None):
        return self.forward_step(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int | None = None):
        return self.forward_step(batch)

    @property
    def training_loss_reduction(self) -> ScaleLossReduction:
        return self._train_reduction

    @property
    def validation_loss_reduction(self) -> ScaleLossReduction:
        return self._val_reduction

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        terms = self._step_terms(self._train_reduction)
        for name in TERM_NAMES if terms else ():
            self.log(f"train/{name}", terms[name], batch_size=1, rank_zero_only=True)

    def on_validation_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # averaged over the pass like NeMo's val_loss (one value per validation step, equal weights),
        # so val_loss = the flow weights · these terms
        terms = self._step_terms(self._val_reduction)
        for name in TERM_NAMES if terms else ():
            self.log(f"val/{name}", terms[name], batch_size=1, on_step=False, on_epoch=True, rank_zero_only=True)

    @staticmethod
    def _step_terms(reduction: ScaleLossReduction) -> dict[str, float]:
        """This step's per-term losses on every rank (collective across the pipeline when PP > 1)."""
        terms = reduction.last_terms if parallel_state.is_pipeline_last_stage() else {}
        reduction.last_terms = {}  # a step without microbatches must not log the previous step's
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            terms = _terms_from_last_stage(terms)
        return terms

    # -- helpers for callbacks and prediction --------------------------------------------------
    def unwrapped_model(self) -> ScaleModel:
        """The ScaleModel inside any DDP/Float16 wrappers NeMo added."""
        module = self.module
        while not isinstance(module, ScaleModel) and hasattr(module, "module"):
            module = module.module
        return module


def _local_device() -> torch.device:
    """This rank's device: its current CUDA device, or the CPU (gloo) where there is none."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _terms_from_last_stage(terms: dict[str, float]) -> dict[str, float]:
    """The last pipeline stage's per-term losses, on every stage of its pipeline.

    Only the last stage computes the loss, but the logger writes on global rank 0, which is a
    first stage when PP > 1: without this broadcast the `train/*` terms were never logged there
    (NeMo broadcasts only the total loss). Every stage calls it once per step, so it is collective.
    """
    device = _local_device()
    vec = torch.zeros(1 + len(TERM_NAMES), dtype=torch.float64, device=device)
    if terms:
        vec[0] = 1.0  # "valid": a step with no microbatches leaves the terms unset
        vec[1:] = torch.tensor([terms[name] for name in TERM_NAMES], dtype=torch.float64)
    torch.distributed.broadcast(
        vec,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    values = vec.tolist()
    return dict(zip(TERM_NAMES, values[1:], strict=True)) if values[0] else {}
