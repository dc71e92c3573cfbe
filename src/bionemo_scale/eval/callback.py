"""Biological metrics during validation: a Lightning callback (what NeMo 2's trainer runs).

At the end of a validation pass it predicts every validation (context, perturbation) group
from control cells of its context and batch, exactly as `bionemo-scale predict` does; the
prediction work is split across data-parallel ranks, run in lockstep by the tensor-parallel
ranks of each, and through the pipeline when PP > 1. The predictions are gathered on the
logging rank (last pipeline stage, TP rank 0, DP rank 0), which computes the metric profile
(cell-eval definitions), writes a per-perturbation CSV, and broadcasts the means so that
every rank logs the same values (checkpoint selection on `val/pearson_delta` is collective).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

from bionemo_scale.atomic import atomic_file
from bionemo_scale.config import ScaleConfig
from bionemo_scale.eval.metrics import compute_metrics

logger = logging.getLogger(__name__)

PAIR_SEP = " | "


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def is_logging_rank() -> bool:
    ps = _ps()
    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def metrics_by_context(
    real_X: np.ndarray,
    pred_X: np.ndarray,
    labels: np.ndarray,
    contexts: np.ndarray,
    genes: list[str],
    control: str,
    profile: str,
) -> pd.DataFrame:
    """compute_metrics per context (each against its own controls); rows named 'context | pert'."""
    frames = []
    for ctx in np.unique(contexts):
        m = contexts == ctx
        res = compute_metrics(real_X[m], labels[m], pred_X[m], labels[m], np.asarray(genes), control, profile=profile)
        frame = res.results.copy()
        first = frame.columns[0]
        frame[first] = [f"{ctx}{PAIR_SEP}{p}" for p in frame[first]]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


class BiologicalMetricsCallback(pl.Callback):
    """Predict the validation pairs and log cell-eval metrics (see the module docstring)."""

    def __init__(
        self,
        out_dir: Path,
        profile: str = "fast",
        every_n_validations: int = 1,
        max_pairs: int | None = None,
        steps: int = 1,
        seed: int = 0,
        save_predictions: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.profile = profile
        self.every = every_n_validations
        self.max_pairs = max_pairs
        self.steps = steps
        self.seed = seed
        self.save_predictions = save_predictions
        self.n_validations = 0
        self.last_means: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: ScaleConfig, run_dir: Path) -> BiologicalMetricsCallback:
        e = cfg.eval
        return cls(
            run_dir / "metrics",
            e.profile,
            e.every_n_validations,
            e.max_pairs,
            e.steps,
            cfg.trainer.seed,
            e.save_predictions,
        )

    # -- prediction ----------------------------------------------------------------------------
    def _val_plans(self, datamodule) -> list:
        from bionemo_scale.predict import plan_predictions

        groups = np.asarray(datamodule.val_groups)
        if self.max_pairs is not None:
            groups = groups[: self.max_pairs]
        return plan_predictions(datamodule.data, groups, self.seed, datamodule.cfg.data.sampler.control_matching)

    @torch.no_grad()
    def _predict_shard(self, pl_module, datamodule, plans: list) -> dict[int, np.ndarray]:
        """Predictions of this data-parallel rank's share of the groups (last stage only)."""
        from bionemo_scale.data.count_lattice import put_on_lattice
        from bionemo_scale.predict import centred_group, compose_shifts, composition_groups, group_conditions

        ps = _ps()
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        data, cfg = datamodule.data, datamodule.cfg
        s = cfg.data.sampler.set_size
        mine = plans[dp_rank::dp_size]
        # Every DP rank must run the same number of pipeline rounds; pad with repeats.
        rounds = math.ceil(len(plans) / dp_size)
        out: dict[int, np.ndarray] = {}
        for i in range(rounds):
            plan = mine[i] if i < len(mine) else mine[-1] if mine else plans[0]
            n = plan.ctrl_rows.size
            n_sets = -(-n // s)
            rng = np.random.default_rng([self.seed, plan.group, 0xAD])
            rows = plan.ctrl_rows
            if n_sets * s > n:
                rows = np.concatenate([rows, rng.choice(plan.ctrl_rows, n_sets * s - n)])
            ctrl_cells = data.gather(rows)
            ctrl = torch.from_numpy(ctrl_cells).view(n_sets, s, -1)
            # the same rule as `predict`: a combination is composed from its singles when asked
            singles = composition_groups(data, plan.group) if cfg.flow.combinations == "compose" else []
            preds = []
            target = centred_group(
                group_conditions(data, plan.group, n_sets, datamodule.priors, datamodule.control_means), ctrl, n
            )
            pool = {k: target[k] for k in ("control_mean",) if k in target}  # the group's cells, its pool
            for group in singles or [plan.group]:
                cond = group_conditions(data, group, n_sets, datamodule.priors) | pool if singles else target
                if datamodule._tables is not None:
                    from bionemo_scale.train.finetune import remap_batch

                    cond = remap_batch(cond, datamodule._tables)
                preds.append(self._forward(pl_module, ctrl, cond, s, clamp=not singles))
            pred = None if any(p is None for p in preds) else preds[0]
            if singles and pred is not None:
                pred = compose_shifts(ctrl.to(preds[0].device), preds, pool.get("control_mean"))
            if pred is not None and i < len(mine):
                cells = pred.reshape(n_sets * s, -1)[:n].float().cpu().numpy()
                if cfg.flow.count_lattice:  # what `predict` writes, so validation scores what users get
                    cells = put_on_lattice(cells, ctrl_cells[:n], self.seed, plan.group)
                out[plan.group] = cells
        return out

    def _forward(self, pl_module, ctrl: torch.Tensor, cond: dict[str, torch.Tensor], set_size: int, clamp: bool = True):
        model = pl_module.unwrapped_model()
        device = next(model.parameters()).device
        ctrl = ctrl.to(device)
        cond = {k: v.to(device) for k, v in cond.items() if k != "pert_id"}
        if _ps().get_pipeline_model_parallel_world_size() == 1:
            return model.predict(ctrl, cond, steps=self.steps, clamp=clamp)
        return self._pipeline_forward(model, ctrl, cond, set_size, clamp)

    def _pipeline_forward(
        self, model, ctrl: torch.Tensor, cond: dict[str, torch.Tensor], set_size: int, clamp: bool = True
    ):
        """One endpoint step (NFE = 1) through megatron's forward-only pipeline schedule."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.steps != 1:
            logger.warning("validation under PP > 1 uses one endpoint step (NFE = 1), not %d", self.steps)
        n = ctrl.shape[0]
        t = torch.zeros(n, device=ctrl.device)

        def step(data_iterator, chunk):
            batch = next(data_iterator)
            output = chunk(batch["ctrl"], batch["t"], batch["cond"], None)

            def collect(output_tensor):
                x1 = output_tensor.x1_hat.clamp_min(0.0) if clamp else output_tensor.x1_hat
                return torch.zeros((), device=x1.device), {"x1_hat": x1.detach()}

            return output, collect

        microbatches = [
            {"ctrl": ctrl[i : i + 1], "t": t[i : i + 1], "cond": {k: v[i : i + 1] for k, v in cond.items()}}
            for i in range(n)
        ]
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=n,
            seq_length=model.num_condition_tokens + 3 * set_size,
            micro_batch_size=1,
            forward_only=True,
        )
        if not _ps().is_pipeline_last_stage():
            return None
        return torch.cat([o["x1_hat"] for o in outputs], dim=0)

    # -- the hook ------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.n_validations += 1
        datamodule = trainer.datamodule
        if (self.n_validations - 1) % self.every or datamodule is None or len(datamodule.val_groups) == 0:
            return
        was_training = pl_module.training
        pl_module.eval()
        plans = self._val_plans(datamodule)
        shard = self._predict_shard(pl_module, datamodule, plans)
        if was_training:
            pl_module.train()
        means = self._gather_and_score(trainer, datamodule, plans, shard)
        for name, value in means.items():
            pl_module.log(f"val/{name}", value, on_epoch=True, sync_dist=False, batch_size=1)
        self.last_means = means

    def _gather_and_score(self, trainer, datamodule, plans, shard: dict[int, np.ndarray]) -> dict[str, float]:
        ps = _ps()
        gathered: list[dict[int, np.ndarray] | None] = [None] * ps.get_data_parallel_world_size()
        if ps.get_data_parallel_world_size() > 1:
            torch.distributed.all_gather_object(gathered, shard, group=ps.get_data_parallel_group())
        else:
            gathered = [shard]
        means: dict[str, float] = {}
        error: Exception | None = None
        if is_logging_rank():
            try:
                preds: dict[int, np.ndarray] = {}
                for part in gathered:
                    preds.update(part or {})
                frame = self._score(datamodule, plans, preds, trainer.global_step)
                numeric = frame.select_dtypes("number")
                means = {c: float(np.nanmean(numeric[c].to_numpy(dtype=float))) for c in numeric.columns}
            except Exception as exc:  # every other rank waits in the broadcast below: tell them
                error = exc
        # The outcome travels with the result, so a failure on the logging rank stops every rank
        # at once instead of leaving them in the next collective until the timeout.
        box: list[dict[str, object] | None] = [
            {"means": means, "failure": None if error is None else f"{type(error).__name__}: {error}"}
        ]
        torch.distributed.broadcast_object_list(box, src=self._logging_global_rank())
        result = box[0]
        assert result is not None
        if result["failure"] is not None:
            if error is not None:
                raise error
            raise RuntimeError(f"validation metrics failed on the logging rank ({result['failure']})")
        return result["means"]  # type: ignore[return-value]

    _src: int | None = None

    def _logging_global_rank(self) -> int:
        """Global rank of the logging rank, found once by an all-gather of flags."""
        if self._src is None:
            flags: list[bool | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(flags, is_logging_rank())
            self._src = flags.index(True)
        return self._src

    def _score(self, datamodule, plans, preds: dict[int, np.ndarray], step: int) -> pd.DataFrame:
        from bionemo_scale.predict import build_anndata

        data = datamodule.data
        pred_X = np.concatenate([preds[p.group] for p in plans])
        pred, real = build_anndata(data, plans, pred_X, kind="validation", lattice=datamodule.cfg.flow.count_lattice)
        labels = real.obs["perturbation"].astype(str).to_numpy()
        contexts = real.obs["context"].astype(str).to_numpy()
        frame = metrics_by_context(
            np.asarray(real.X.todense()),
            np.asarray(pred.X.todense()),
            labels,
            contexts,
            data.genes,
            data.index.control_label,
            self.profile,
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.out_dir / f"val_step{step:07d}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        if self.save_predictions:
            with atomic_file(self.out_dir / f"val_step{step:07d}_pred.h5ad") as tmp:
                pred.write_h5ad(tmp)
            with atomic_file(self.out_dir / f"val_step{step:07d}_real.h5ad") as tmp:
                real.write_h5ad(tmp)
        logger.info(
            "validation metrics at step %d: %s",
            step,
            {c: round(float(np.nanmean(frame[c].to_numpy(dtype=float))), 4) for c in frame.select_dtypes("number")},
        )
        return frame
